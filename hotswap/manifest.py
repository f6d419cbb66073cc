"""The manifest: a version's complete, immutable description, and its wire form.

Pure: imports no Redis. On the wire a manifest is a msgpack *envelope*
``{"format", "body", "kid", "sig"}`` whose ``body`` holds the canonical
msgpack bytes of the fields; the HMAC-SHA256 signature covers exactly those
bytes, so verifying never depends on re-encoding.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from hotswap.entries import (
    DEFAULT_LIMITS,
    ENTRY_ARRAYS,
    MAX_CHUNK_BYTES,
    MAX_FIELDS,
    MAX_MESSAGE_LEN,
    MAX_NAME_LEN,
    MAX_NDIM,
    MIN_CHUNK_BYTES,
    DeltaRef,
    EntryCache,
    Limits,
    TensorEntry,
    entry_wire,
    not_msgpack,
    unpack,
)
from hotswap.errors import ConfigError, FormatError, SourceError
from hotswap.signing import key_id, sign, verify_signature

FORMAT = 1
# Written only by a manifest with a delta entry: a reader of format 1 then
# refuses it with "upgrade" instead of misreading it (rolling upgrades).
FORMAT_DELTA = 2
# Written only by a manifest with per-chunk digests (issue 19; deltas allowed
# too): readers of formats 1-2 refuse it with "upgrade".
FORMAT_CHUNKS = 3
FORMATS = (FORMAT, FORMAT_DELTA, FORMAT_CHUNKS)
KINDS = ("publish", "rollback")


@dataclass(frozen=True)
class Manifest:
    """A version of a model: metadata plus every tensor's entry, sorted by name."""

    model: str
    version: int
    parent: int | None
    lineage: str
    tensors: tuple[TensorEntry, ...]
    kind: str = "publish"
    rollback_to: int | None = None
    created: float = 0.0
    author: str = ""
    message: str = ""
    key_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if names != sorted(names):
            object.__setattr__(self, "tensors", tuple(sorted(self.tensors, key=lambda t: t.name)))

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT",
    "FORMAT_CHUNKS",
    "FORMAT_DELTA",
    "KINDS",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_LEN",
    "MAX_NAME_LEN",
    "MAX_NDIM",
    "MIN_CHUNK_BYTES",
    "DeltaRef",
    "EntryCache",
    "Limits",
    "Manifest",
    "TensorEntry",
    "decode",
    "derive",
    "encode",
    "key_id",
    "new_lineage",
    "verify_signature",
]


def new_lineage() -> str:
    """A random id for a fresh history (first publish into an empty keyspace)."""
    return secrets.token_hex(16)


def _body(m: Manifest) -> dict[str, Any]:
    return {
        "model": m.model,
        "version": m.version,
        "parent": m.parent,
        "lineage": m.lineage,
        "kind": m.kind,
        "rollback_to": m.rollback_to,
        "created": float(m.created),
        "author": m.author,
        "message": m.message,
        "tensors": [entry_wire(t) for t in m.tensors],
    }


def _check_encodable(m: Manifest) -> None:
    # Refuse here what decode would refuse, or a commit would make a head
    # that no agent can read.
    where = f"manifest of {m.model} v{m.version}"
    for what, text in (("message", m.message), ("author", m.author)):
        size = len(text.encode())
        if size > MAX_MESSAGE_LEN:
            raise ConfigError(f"{where}: {what} is {size} bytes, limit {MAX_MESSAGE_LEN}")
    for t in m.tensors:
        if not 0 < len(t.name) <= MAX_NAME_LEN:
            raise SourceError(
                f"{where}: tensor name {t.name[:64]!r} has {len(t.name)} characters, "
                f"need 1-{MAX_NAME_LEN}; rename it"
            )
        if len(t.shape) > MAX_NDIM:
            raise SourceError(
                f"{where}: tensor {t.name!r} has {len(t.shape)} dimensions, limit {MAX_NDIM}"
            )


def encode(m: Manifest, signing_key: bytes | None = None) -> bytes:
    """Canonical wire bytes of a manifest, signed when a key is given."""
    _check_encodable(m)
    body = msgpack.packb(_body(m), use_bin_type=True)
    form = FORMAT
    if any(t.chunk_digests is not None for t in m.tensors):
        form = FORMAT_CHUNKS
    elif any(t.delta is not None for t in m.tensors):
        form = FORMAT_DELTA
    envelope: dict[str, Any] = {"format": form, "body": body, "kid": None, "sig": None}
    if signing_key:
        envelope["kid"], envelope["sig"] = sign(body, signing_key)
    return bytes(msgpack.packb(envelope, use_bin_type=True))


# Every array unpacked has a small length limit (see ``entries``); the one long
# array, the tensor list, is read header first and then entry by entry.
_ENVELOPE_ARRAYS = 16  # the envelope holds no arrays: any is refused as "not an envelope"


def _check_size(data: bytes, limits: Limits, what: str) -> None:
    if len(data) > limits.max_manifest_bytes:
        raise FormatError(
            f"{what} is {len(data)} bytes, over the {limits.max_manifest_bytes} limit"
        )


def _unpack_envelope(data: bytes, limits: Limits, what: str) -> Any:
    _check_size(data, limits, what)
    return unpack(data, limits, what, _ENVELOPE_ARRAYS)


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)  # fixmap, map 16, map 32


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)  # fixarray, array 16, array 32


def _unpack_body(data: bytes, limits: Limits, what: str) -> Any:
    """The body as unpackb would return it, but with each tensor entry left as its bytes."""
    _check_size(data, limits, what)
    u = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
        max_bin_len=limits.max_manifest_bytes,
        max_str_len=max(MAX_MESSAGE_LEN, MAX_NAME_LEN),
        max_array_len=ENTRY_ARRAYS,
        max_map_len=MAX_FIELDS,
        max_ext_len=0,
    )
    try:
        u.feed(data)
        if not data or not _is_map(data[0]):
            body: Any = u.unpack()  # not a map: decode's field check refuses it
        else:
            fields = u.read_map_header()
            if fields > MAX_FIELDS:
                raise ValueError(f"{fields} exceeds max_map_len({MAX_FIELDS})")
            body = {}
            for _ in range(fields):
                key = u.unpack()
                if not isinstance(key, (str, bytes)):
                    raise ValueError(f"{type(key).__name__} is not allowed for map key")
                pos = u.tell()
                if key == "tensors" and pos < len(data) and _is_array(data[pos]):
                    count = u.read_array_header()
                    if count > limits.max_tensors:
                        raise FormatError(
                            f"{what}: declares more than {limits.max_tensors} tensors"
                        )
                    # Each entry's wire bytes: decode parses only those it has not seen.
                    entries: list[bytes] = []
                    for _ in range(count):
                        start = u.tell()
                        u.skip()
                        entries.append(data[start : u.tell()])
                    body[key] = entries
                else:
                    body[key] = u.unpack()
        if u.tell() != len(data):
            raise ValueError(f"{len(data) - u.tell()} bytes after the end")
    except FormatError:
        raise
    except Exception as e:
        raise not_msgpack(what, e) from e
    return body


def _need(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise FormatError(f"{what}: {problem}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional_int(v: Any) -> bool:
    return v is None or (_int(v) and v >= 0)


def decode(
    data: bytes,
    *,
    keys: Sequence[bytes] = (),
    limits: Limits = DEFAULT_LIMITS,
    expect_model: str | None = None,
    expect_version: int | None = None,
    cache: EntryCache | None = None,
) -> Manifest:
    """Parse and check manifest bytes; with ``keys``, require a valid signature.

    Raises FormatError for anything malformed or over the limits and
    SignatureError for a missing, unknown or wrong signature. ``cache``
    reuses the entries of the manifest it last decoded.
    """
    where = (
        "manifest" if expect_version is None else f"manifest of {expect_model} v{expect_version}"
    )
    env = _unpack_envelope(data, limits, where)
    _need(
        isinstance(env, dict) and set(env) == {"format", "body", "kid", "sig"},
        where,
        "not a manifest envelope",
    )
    _need(
        env["format"] in FORMATS,
        where,
        f"format {env['format']!r} is not supported (this hotswap reads "
        f"{', '.join(map(str, FORMATS))}); upgrade",
    )
    body_bytes, kid, sig = env["body"], env["kid"], env["sig"]
    _need(isinstance(body_bytes, bytes), where, "body is not bytes")
    _need(kid is None or isinstance(kid, str), where, "bad key id")
    _need(sig is None or isinstance(sig, bytes), where, "bad signature field")
    if keys:
        verify_signature(body_bytes, kid, sig, keys, where)
    body = _unpack_body(body_bytes, limits, where)
    fields = {
        "model",
        "version",
        "parent",
        "lineage",
        "kind",
        "rollback_to",
        "created",
        "author",
        "message",
        "tensors",
    }
    _need(isinstance(body, dict) and set(body) == fields, where, "fields missing or unknown")
    _need(isinstance(body["model"], str), where, "bad model")
    _need(_int(body["version"]) and body["version"] > 0, where, "bad version")
    _need(
        _optional_int(body["parent"]) and _optional_int(body["rollback_to"]),
        where,
        "bad parent or rollback target",
    )
    _need(body["kind"] in KINDS, where, f"unknown kind {body['kind']!r}")
    _need(isinstance(body["lineage"], str) and 0 < len(body["lineage"]) <= 64, where, "bad lineage")
    _need(isinstance(body["created"], float), where, "bad creation time")
    _need(
        isinstance(body["author"], str) and isinstance(body["message"], str),
        where,
        "bad author or message",
    )
    raw_tensors = body["tensors"]
    _need(
        isinstance(raw_tensors, list) and len(raw_tensors) <= limits.max_tensors,
        where,
        f"declares more than {limits.max_tensors} tensors",
    )
    entries = (cache or EntryCache()).entries(raw_tensors, limits, where)
    _need(
        env["format"] != FORMAT or all(e.delta is None for e in entries),
        where,
        f"a delta entry in a format {FORMAT} manifest",
    )
    _need(
        env["format"] == FORMAT_CHUNKS or all(e.chunk_digests is None for e in entries),
        where,
        f"chunk digests in a format {env['format']} manifest",
    )
    names = [e.name for e in entries]
    _need(len(set(names)) == len(names), where, "duplicate tensor names")
    m = Manifest(
        model=body["model"],
        version=body["version"],
        parent=body["parent"],
        lineage=body["lineage"],
        tensors=entries,
        kind=body["kind"],
        rollback_to=body["rollback_to"],
        created=body["created"],
        author=body["author"],
        message=body["message"],
        key_id=kid,
    )
    if expect_model is not None and m.model != expect_model:
        raise FormatError(f"{where}: belongs to model {m.model!r}")
    if expect_version is not None and m.version != expect_version:
        raise FormatError(f"{where}: says it is version {m.version}")
    return m


def derive(base: Manifest, **changes: Any) -> Manifest:
    """A copy of ``base`` with fields changed (tensors re-sorted)."""
    return replace(base, **changes)
