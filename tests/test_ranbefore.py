"""``RanBefore``: the last few contents per tensor name, bounded, snapshots independent."""

from __future__ import annotations

import pytest

from hotswap.ranbefore import KEEP, RanBefore


def test_the_last_few_contents_per_name_are_remembered_and_older_ones_forgotten() -> None:
    ran = RanBefore()
    for i in range(KEEP + 1):
        ran.record({"w": f"d{i}", "b": "zero"})
    assert not ran.seen("w", "d0")
    assert all(ran.seen("w", f"d{i}") for i in range(1, KEEP + 1))
    assert ran.seen("b", "zero")
    assert not ran.seen("b", "d1")  # per name: another name's content is not this one's
    assert not ran.seen("x", "zero")


def test_a_content_that_comes_back_moves_to_the_front_and_is_kept_once() -> None:
    ran = RanBefore(keep=2)
    ran.record([("w", "a"), ("w", "b")])
    ran.record({"w": "a"})  # a rollback to a
    ran.record({"w": "c"})
    assert ran.seen("w", "a") and ran.seen("w", "c") and not ran.seen("w", "b")


def test_a_copy_is_a_snapshot() -> None:
    ran = RanBefore()
    ran.record({"w": "a"})
    snap = ran.copy()
    ran.record({"w": "b"})
    assert snap.seen("w", "a") and not snap.seen("w", "b")
    assert ran.seen("w", "b")


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keep must be at least 1, not 0"):
        RanBefore(keep=0)
