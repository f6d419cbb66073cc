"""The wire dtypes: names and item sizes, without torch.

Reading a manifest (``hotswap status``, ``show``, ``diff``) needs only each
dtype's name and width; importing torch for that would cost seconds. The
torch mapping lives in ``hotswap.codec``, which checks at import that it
agrees with this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIGEST_HEX_LEN = 64


@dataclass(frozen=True)
class WireDtype:
    """A dtype as the manifest names it, and the bytes one element takes."""

    name: str
    itemsize: int


# Every name the wire format defines, whether or not this torch has it: a
# manifest reads the same everywhere, and an agent whose torch lacks a dtype
# refuses that tensor when it compares dtypes with its live model.
DTYPES: dict[str, WireDtype] = {
    w.name: w
    for w in (
        WireDtype("F64", 8),
        WireDtype("F32", 4),
        WireDtype("F16", 2),
        WireDtype("BF16", 2),
        WireDtype("I64", 8),
        WireDtype("I32", 4),
        WireDtype("I16", 2),
        WireDtype("I8", 1),
        WireDtype("U8", 1),
        WireDtype("BOOL", 1),
        WireDtype("C128", 16),
        WireDtype("C64", 8),
        WireDtype("C32", 4),
        WireDtype("U16", 2),
        WireDtype("U32", 4),
        WireDtype("U64", 8),
        WireDtype("F8_E4M3", 1),
        WireDtype("F8_E5M2", 1),
        WireDtype("F8_E4M3FNUZ", 1),
        WireDtype("F8_E5M2FNUZ", 1),
        WireDtype("F8_E8M0", 1),
        WireDtype("F4_E2M1_X2", 1),  # two 4-bit values packed in each byte
    )
}


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    """How many chunks of at most ``chunk_bytes`` hold ``nbytes`` (0 for none)."""
    return math.ceil(nbytes / chunk_bytes) if nbytes else 0
