"""The pub/sub notice announcing a new head: small msgpack, never trusted alone.

A notice only wakes agents up; they re-read head and the signed manifest,
so a forged or garbled notice can at worst cause one extra read.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from hotswap.errors import FormatError

MAX_NOTICE_BYTES = 4096


@dataclass(frozen=True)
class Notice:
    model: str
    version: int
    kind: str
    lineage: str


def encode(notice: Notice) -> bytes:
    return bytes(
        msgpack.packb(
            {
                "model": notice.model,
                "version": notice.version,
                "kind": notice.kind,
                "lineage": notice.lineage,
            },
            use_bin_type=True,
        )
    )


def decode(data: bytes) -> Notice:
    """Parse a notice; FormatError for anything else."""
    if len(data) > MAX_NOTICE_BYTES:
        raise FormatError(f"notice is {len(data)} bytes, over the {MAX_NOTICE_BYTES} limit")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=256,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as e:
        raise FormatError(f"notice is not valid msgpack: {type(e).__name__}") from e
    if not (
        isinstance(raw, dict)
        and set(raw) == {"model", "version", "kind", "lineage"}
        and isinstance(raw["model"], str)
        and isinstance(raw["kind"], str)
        and isinstance(raw["lineage"], str)
        and isinstance(raw["version"], int)
        and not isinstance(raw["version"], bool)
    ):
        raise FormatError(f"notice has the wrong fields: {raw!r:.200}")
    return Notice(raw["model"], raw["version"], raw["kind"], raw["lineage"])
