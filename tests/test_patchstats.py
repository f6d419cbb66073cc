"""A sparse delta's statistics derived from its changed elements (``publisher.patchstats``)
agree with a full pass, and every case a full pass must decide says None."""

from __future__ import annotations

import math

import pytest
import torch

from hotswap import codec, delta
from hotswap.manifest import TensorEntry
from publisher import patchstats

CHUNK = 4096


def entry(name: str, t: torch.Tensor, stats: codec.Stats | None = None) -> TensorEntry:
    s = stats or codec.stats(t)
    data = codec.as_bytes(t)
    return TensorEntry(
        name, codec.dtype_name(t.dtype), tuple(t.shape), len(data), codec.digest(data), CHUNK,
        s.norm, s.max_abs,
    )  # fmt: skip


def step(t: torch.Tensor, count: int, seed: int, scale: float = 1e-2) -> torch.Tensor:
    """``t`` with ``count`` elements nudged (never its largest magnitude)."""
    g = torch.Generator().manual_seed(seed)
    out = t.clone().view(-1)
    top = int(out.float().abs().argmax())
    at = torch.randperm(out.numel(), generator=g)[:count]
    at = at[at != top]
    out[at] = (out[at].float() * (1 + scale * torch.randn(at.numel(), generator=g))).to(t.dtype)
    return out.view(t.shape)


def frames_of(new: torch.Tensor, old: torch.Tensor) -> list[bytes]:
    frames = delta.encode(
        codec.as_bytes(new), codec.as_bytes(old), CHUNK, itemsize=new.element_size(), probe=False
    )
    assert frames is not None
    return frames


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_derived_statistics_agree_with_a_full_pass_along_a_chain(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(64, 512, generator=g) * 0.02).to(dtype)
    parent = entry("w", t)
    worst = 0.0
    # Each link derived from the last derived figures: the drift a chain can build.
    for i in range(32):
        new = step(t, 300, seed=i)
        got = patchstats.derived(parent, entry("w", new), frames_of(new, t), codec.as_bytes(t))
        assert got is not None
        full = codec.stats(new)
        assert got.max_abs == full.max_abs
        worst = max(worst, abs(got.norm - full.norm) / full.norm)
        parent, t = entry("w", new, got), new
    assert worst < 1e-12


def test_what_a_full_pass_must_decide_is_none() -> None:
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(64, 512, generator=g) * 0.02).to(torch.bfloat16)
    parent, base = entry("w", t), codec.as_bytes(t)

    def derive(new: torch.Tensor, p: TensorEntry = parent) -> codec.Stats | None:
        return patchstats.derived(p, entry("w", new), frames_of(new, t), base)

    # The largest magnitude changed: another element may or may not hold it now.
    flat = t.clone().view(-1)
    top = int(flat.float().abs().argmax())
    flat[top] = flat[top] / 2
    assert derive(flat.view(t.shape)) is None
    # A NaN or an infinity among the new values.
    for bad in (math.nan, math.inf):
        new = t.clone()
        new.view(-1)[5] = bad
        assert derive(new) is None
    # Most of the norm gone: the subtraction would cancel its digits.
    big = torch.full((64, 512), 1e-3).to(torch.bfloat16)
    big.view(-1)[:1000] = 9.875
    big.view(-1)[2000] = 10.0
    small = big.clone()
    small.view(-1)[:1000] = 0
    got = patchstats.derived(
        entry("w", big), entry("w", small), frames_of(small, big), codec.as_bytes(big)
    )
    assert got is None
    # No frames for a tensor of chunks: nothing to derive from.
    assert patchstats.derived(parent, entry("w", step(t, 10, 5)), [], base) is None
    # A parent without finite figures, a float64 tensor.
    assert derive(step(t, 10, 3), entry("w", t, codec.Stats(math.nan, math.nan))) is None
    t64 = t.to(torch.float64)
    new64 = step(t64, 10, 4)
    frames = frames_of(new64, t64)
    assert (
        patchstats.derived(entry("w", t64), entry("w", new64), frames, codec.as_bytes(t64)) is None
    )


def test_a_frame_of_another_encoding_leaves_it_to_a_full_pass() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(64, 512, generator=g).to(torch.float32)
    new = t * (1 + 1e-4 * torch.randn(t.shape, generator=g))  # every element: shuffled XOR
    frames = frames_of(new, t)
    assert {delta.read_header(f).encoding for f in frames} == {delta.Encoding.SHUFFLE_ZSTD}
    assert patchstats.derived(entry("w", t), entry("w", new), frames, codec.as_bytes(t)) is None


def test_a_delta_that_changes_many_elements_is_measured_whole() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(64, 512, generator=g).to(torch.bfloat16)
    few, many = step(t, 900, seed=1), step(t, 2000, seed=1)  # 2.7% and 6% of 32768
    base = codec.as_bytes(t)
    assert patchstats.derived(entry("w", t), entry("w", few), frames_of(few, t), base)
    frames = frames_of(many, t)
    assert {delta.read_header(f).encoding for f in frames} == {delta.Encoding.SPARSE_ZSTD}
    assert patchstats.derived(entry("w", t), entry("w", many), frames, base) is None
