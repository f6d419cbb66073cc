"""The pub/sub notice announcing a new head: small msgpack, never trusted alone.

A notice wakes agents up and names the version. It also carries that
version's manifest bytes when they are small (``carried``), so that an agent
can start fetching without a round trip to Redis first: the agent verifies
them like a manifest read from Redis (signature included), and before it
applies or refuses anything it reads the manifest Redis holds and compares.
A forged or garbled notice can at worst cost one fetch, after which the
agent stops using carried manifests.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from hotswap.errors import FormatError

# A manifest of about 600 tensors; larger ones are read from Redis. Every
# subscriber gets every notice, so this bounds what a publish fans out.
MAX_CARRIED_MANIFEST = 64 * 1024
MAX_NOTICE_BYTES = MAX_CARRIED_MANIFEST + 4096
_FIELDS = {"model", "version", "kind", "lineage"}


@dataclass(frozen=True)
class Notice:
    model: str
    version: int
    kind: str
    lineage: str
    # The version's manifest as stored in Redis, when small enough to carry.
    manifest: bytes | None = None


def carried(manifest_bytes: bytes) -> bytes | None:
    """The manifest bytes a notice carries: these, unless over the limit."""
    return manifest_bytes if len(manifest_bytes) <= MAX_CARRIED_MANIFEST else None


def encode(notice: Notice) -> bytes:
    fields: dict[str, object] = {
        "model": notice.model,
        "version": notice.version,
        "kind": notice.kind,
        "lineage": notice.lineage,
    }
    if notice.manifest is not None:
        fields["manifest"] = notice.manifest
    return bytes(msgpack.packb(fields, use_bin_type=True))


def decode(data: bytes) -> Notice:
    """Parse a notice; FormatError for anything else."""
    if len(data) > MAX_NOTICE_BYTES:
        raise FormatError(f"notice is {len(data)} bytes, over the {MAX_NOTICE_BYTES} limit")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=256,
            max_bin_len=MAX_CARRIED_MANIFEST,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as e:
        raise FormatError(f"notice is not valid msgpack: {type(e).__name__}") from e
    if not (
        isinstance(raw, dict)
        and set(raw) in (_FIELDS, _FIELDS | {"manifest"})
        and isinstance(raw.get("manifest", b""), bytes)
        and isinstance(raw["model"], str)
        and isinstance(raw["kind"], str)
        and isinstance(raw["lineage"], str)
        and isinstance(raw["version"], int)
        and not isinstance(raw["version"], bool)
    ):
        raise FormatError(f"notice has the wrong fields: {raw!r:.200}")
    return Notice(raw["model"], raw["version"], raw["kind"], raw["lineage"], raw.get("manifest"))


# A notice that says only "look again": a rollout moved what some agents
# follow (``hotswap.pins``). It names no version, so an agent that reads it
# cannot be led to apply anything but what Redis says it follows; agents
# older than pins read it as garbled, which also makes them look at head.
LOOK_KIND = "look"


def encode_look(model: str) -> bytes:
    """The notice that sends every agent of ``model`` to look at what it follows.

    Example:
        >>> is_look(encode_look("m"), "m"), is_look(encode_look("m"), "other")
        (True, False)
    """
    return bytes(msgpack.packb({"model": model, "kind": LOOK_KIND}, use_bin_type=True))


def is_look(data: bytes, model: str) -> bool:
    """Whether ``data`` is ``encode_look(model)``'s notice (exactly those bytes)."""
    return data == encode_look(model)
