"""Notice: tiny msgpack, strictly parsed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from hotswap import notice
from hotswap.errors import FormatError
from hotswap.notice import Notice


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def test_round_trip() -> None:
    n = Notice("m", 12, "rollback", "ab" * 16)
    data = notice.encode(n)
    assert notice.decode(data) == n
    assert msgpack.unpackb(data) == {
        "model": "m",
        "version": 12,
        "kind": "rollback",
        "lineage": "ab" * 16,
    }


def test_golden_bytes() -> None:
    data = notice.encode(Notice("m", 3, "publish", "l"))
    assert data == (b"\x84\xa5model\xa1m\xa7version\x03\xa4kind\xa7publish\xa7lineage\xa1l")


def test_oversized_notice_is_refused() -> None:
    data = b"\x00" * (notice.MAX_NOTICE_BYTES + 1)
    with pytest.raises(FormatError) as e:
        notice.decode(data)
    assert str(e.value) == f"notice is {notice.MAX_NOTICE_BYTES + 1} bytes, over the 4096 limit"


@pytest.mark.parametrize("data", [b"\xc1", b"", b"\x81\xa1a", b"\x84" + b"\x00" * 4])
def test_malformed_msgpack_is_refused(data: bytes) -> None:
    with pytest.raises(FormatError, match=r"^notice is not valid msgpack: \w+$"):
        notice.decode(data)


GOOD = {"model": "m", "version": 3, "kind": "publish", "lineage": "l"}


@pytest.mark.parametrize(
    "raw",
    [
        "m",
        7,
        {k: v for k, v in GOOD.items() if k != "kind"},
        {**GOOD, "extra": 1},
        {**GOOD, "version": "3"},
        {**GOOD, "version": True},
        {**GOOD, "model": 1},
        {**GOOD, "lineage": None},
    ],
)
def test_wrong_fields_are_refused(raw: Any) -> None:
    with pytest.raises(FormatError) as e:
        notice.decode(pack(raw))
    assert str(e.value).startswith("notice has the wrong fields: ")
    assert "\n" not in str(e.value)


def test_binary_and_nested_values_are_refused() -> None:
    with pytest.raises(FormatError, match="not valid msgpack"):
        notice.decode(pack([1, 2]))
    with pytest.raises(FormatError, match="not valid msgpack"):
        notice.decode(pack({**GOOD, "model": b"m"}))
    with pytest.raises(FormatError, match="not valid msgpack"):
        notice.decode(pack({**GOOD, "model": ["m"]}))
