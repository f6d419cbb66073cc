"""patchcheck: statistics and verdicts from a patch equal the full checks' (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import codec, patchcheck, validate
from hotswap.manifest import TensorEntry

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SPECIAL = [math.nan, math.inf, -math.inf, 0.0, 1e4, -1e-3]


def entry_of(t: torch.Tensor) -> TensorEntry:
    buf = codec.as_bytes(t)
    s = codec.stats(t)
    return TensorEntry(
        "w", codec.dtype_name(t.dtype), tuple(t.shape), len(buf), "0" * 64, 4096, s.norm, s.max_abs
    )


@st.composite
def patched(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    old = (torch.randn(n, generator=g) * draw(st.sampled_from([1e-2, 1.0, 30.0]))).to(dtype)
    count = draw(st.integers(0, max(1, n // 8)))
    index = torch.unique(torch.randint(0, n, (count,), generator=g))
    new = old.clone()
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 5.0]))
    new[index] = (
        old[index].double() + torch.randn(index.numel(), generator=g).double() * scale
    ).to(dtype)
    for value in draw(st.lists(st.sampled_from(SPECIAL), max_size=2)):
        if index.numel():
            new[index[draw(st.integers(0, index.numel() - 1))]] = value
    return new, old, index


@settings(max_examples=300, deadline=None)
@given(case=patched())
def test_derived_statistics_equal_a_full_pass(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    new, old, index = case
    old_norm = codec.norm(old)
    at_new, at_old = new[index], old[index]
    kept = [bytes(codec.as_bytes(t)) for t in (at_new, at_old)]
    got = patchcheck.derive(at_new, at_old, old_norm)
    # The patch's values are what the writer lock scatters: never written here.
    assert [bytes(codec.as_bytes(t)) for t in (at_new, at_old)] == kept
    full_finite = bool(torch.isfinite(new.double()).all())
    if got is None:  # a non-finite value, or the norm fell by 100x or more: a full pass decides
        assert not full_finite or codec.norm(new) ** 2 < patchcheck.MAX_FALL * old_norm**2 * (
            1 + 1e-9
        )
        return
    assert full_finite
    assert math.isclose(got.norm, codec.norm(new), rel_tol=1e-12)
    full_change = validate.relative_change(new, old, old_norm)
    assert math.isclose(got.relative_change, full_change, rel_tol=1e-6, abs_tol=1e-300)


@settings(max_examples=300, deadline=None)
@given(
    case=patched(),
    low=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
    high=st.sampled_from([1.0001, 1.01, 2.0, 10.0]),
    limit=st.sampled_from([None, 1e-3, 1e-2, 0.1, 1.0]),
    finite=st.booleans(),
)
def test_a_patch_passes_exactly_where_the_full_checks_pass(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    low: float,
    high: float,
    limit: float | None,
    finite: bool,
) -> None:
    new, old, index = case
    rules = validate.Policy(
        check_finite=finite, norm_ratio=(low, high), max_relative_change=limit
    ).rules_for("w")
    old_norm = codec.norm(old)
    entry = entry_of(new)
    full = validate.check_values("w", entry, new, old, rules, old_norm=old_norm)
    fast = patchcheck.passes(entry, new[index], old[index], rules=rules, old_norm=old_norm)
    if fast:
        assert full == []  # never lets through what the full checks refuse
    elif full == [] and old_norm > 0 and math.isfinite(old_norm):
        # It declines only near a bound (within its margin), after a 100x fall, or for
        # non-finite values (unchecked: the full checks compare NaN norms).
        if not bool(torch.isfinite(new.double()).all()):
            return
        new_norm, change = codec.norm(new), validate.relative_change(new, old, old_norm)
        near = [
            abs(new_norm / old_norm - bound) <= 1e-5 * bound for bound in (low, high) if bound
        ] + [limit is not None and abs(change - limit) <= 1e-5 * limit]
        assert any(near) or new_norm**2 < patchcheck.MAX_FALL * old_norm**2 * (1 + 1e-9)


def test_a_validator_or_an_unknown_old_norm_takes_the_full_checks() -> None:
    old = torch.ones(64)
    new = old.clone()
    new[3] = 1.5
    index = torch.tensor([3])
    rules = validate.Policy().rules_for("w")
    entry = entry_of(new)
    assert patchcheck.passes(entry, new[index], old[index], rules=rules, old_norm=8.0)
    assert not patchcheck.passes(entry, new[index], old[index], rules=rules, old_norm=None)
    assert not patchcheck.passes(entry, new[index], old[index], rules=rules, old_norm=math.nan)
    with_validator = validate.Policy(validators=[lambda n, a, b: None]).rules_for("w")
    assert not patchcheck.passes(entry, new[index], old[index], rules=with_validator, old_norm=8.0)
    strict = validate.Policy(norm_tolerance=1e-9).rules_for("w")
    assert not patchcheck.passes(entry, new[index], old[index], rules=strict, old_norm=8.0)
