"""hotswap.patches: joining chunk patches, and when the writer lock scatters or copies whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hotswap import patches
from hotswap.copies import apply, pairs, patched
from hotswap.encodings import Patched
from hotswap.manifest import Manifest
from hotswap.staging import LiveModel, Plan, Staged


def test_union_and_joined_give_indices_into_the_whole_tensor() -> None:
    a = Patched(2, np.array([1, 5], np.uint64))
    b = Patched(2, np.array([5, 7], np.uint64))
    u = patches.union([a, b])
    assert u is not None and u.at.tolist() == [1, 5, 7]
    assert patches.union([a, None]) is None
    base = memoryview(np.arange(8, dtype=np.int16).tobytes())
    after = memoryview((np.arange(8, dtype=np.int16) + 100).tobytes())
    piece = patches.piece(a, base, after)
    assert piece is not None and piece.old.tolist() == [1, 5] and piece.new.tolist() == [101, 105]
    where = patches.joined({0: piece, 1: piece}, [(0, 16), (16, 32)])
    assert where is not None and where.index.tolist() == [1, 5, 9, 13]
    assert patches.joined({0: piece, 1: None}, [(0, 16), (16, 32)]) is None
    assert patches.joined({0: piece}, [(0, 16), (16, 32)]) is None


def _staged(new: torch.Tensor, old: torch.Tensor, base: str) -> Staged:
    index = torch.nonzero(new.view(torch.int16) != old.view(torch.int16)).view(-1).numpy()
    words = patches.Where(
        2, index, old.view(torch.int16).numpy()[index], new.view(torch.int16).numpy()[index]
    )
    staged = Staged(Plan(Manifest("m", 1, None, "l", ()), [], {}), {"w": new}, {}, 0, 0.0)
    staged.patches["w"] = patches.make(base, words, new)
    return staged


@pytest.mark.parametrize(("size", "changed"), [(4096, 40), (1 << 21, 120_000)])
def test_the_writer_lock_scatters_a_patch_of_what_runs_bit_exact(size: int, changed: int) -> None:
    g = torch.Generator().manual_seed(0)
    old = torch.randn(size, generator=g).to(torch.bfloat16)
    new = old.clone()
    new[torch.randint(0, size, (changed,), generator=g)] += 1
    live_tensor = torch.nn.Parameter(old.clone())
    live = LiveModel({"w": live_tensor})
    staged = _staged(new, old, "d1")
    copies = pairs(staged, live, {"w": "d1"})
    assert patched(copies) == 1
    where = live_tensor.data_ptr()
    apply(copies)
    assert torch.equal(live_tensor.detach().view(torch.int16), new.view(torch.int16))
    assert live_tensor.data_ptr() == where


def test_a_patch_from_other_bytes_than_run_or_too_large_is_copied_whole() -> None:
    old = torch.zeros(4096, dtype=torch.bfloat16)
    new = old.clone()
    new[:8] = 1
    live = LiveModel({"w": old.clone()})
    staged = _staged(new, old, "d1")
    # What runs is not the patch's base (or unknown): the whole staged tensor.
    for running in ({"w": "d0"}, {}, None):
        copies = pairs(staged, live, running)
        assert patched(copies) == 0 and copies[0][1] is new
    many = old.clone()
    many[: 4096 // 8] = 1  # 1/8 of the elements: past SCATTER_MAX_FRACTION
    copies = pairs(_staged(many, old, "d1"), live, {"w": "d1"})
    assert patched(copies) == 0 and copies[0][1] is many
    # A cast or transform that replaced the staged tensor leaves the patch unused.
    staged.tensors["w"] = new.clone()
    assert patched(pairs(staged, live, {"w": "d1"})) == 0
