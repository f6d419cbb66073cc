"""Notice: small msgpack, strictly parsed; it may carry a small manifest's bytes."""

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


def test_round_trip_carrying_a_manifest() -> None:
    carried = bytes(range(256)) * 4
    n = Notice("m", 12, "publish", "ab" * 16, carried)
    data = notice.encode(n)
    assert notice.decode(data) == n
    assert msgpack.unpackb(data)["manifest"] == carried


def test_only_manifests_within_the_limit_are_carried() -> None:
    small = b"x" * notice.MAX_CARRIED_MANIFEST
    assert notice.carried(small) is small
    assert notice.carried(small + b"x") is None
    n = Notice("m", 1, "publish", "l", small)
    assert notice.decode(notice.encode(n)).manifest == small


def test_oversized_notice_is_refused() -> None:
    data = b"\x00" * (notice.MAX_NOTICE_BYTES + 1)
    with pytest.raises(FormatError) as e:
        notice.decode(data)
    assert str(e.value) == (
        f"notice is {notice.MAX_NOTICE_BYTES + 1} bytes, over the {notice.MAX_NOTICE_BYTES} limit"
    )


def test_carried_manifest_over_the_limit_is_refused() -> None:
    data = pack({**GOOD, "manifest": b"x" * (notice.MAX_CARRIED_MANIFEST + 1)})
    assert len(data) <= notice.MAX_NOTICE_BYTES
    with pytest.raises(FormatError, match=r"^notice is not valid msgpack: \w+$"):
        notice.decode(data)


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
        {**GOOD, "manifest": "text, not bytes"},
        {**GOOD, "manifest": None},
        {**GOOD, "model": b"m"},
    ],
)
def test_wrong_fields_are_refused(raw: Any) -> None:
    with pytest.raises(FormatError) as e:
        notice.decode(pack(raw))
    assert str(e.value).startswith("notice has the wrong fields: ")
    assert "\n" not in str(e.value)


def test_nested_values_are_refused() -> None:
    with pytest.raises(FormatError, match="not valid msgpack"):
        notice.decode(pack([1, 2]))
    with pytest.raises(FormatError, match="not valid msgpack"):
        notice.decode(pack({**GOOD, "model": ["m"]}))
