"""The validation policy and its checks: pure, no Redis."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from hotswap import codec, validate
from hotswap.errors import ValidationError
from hotswap.manifest import TensorEntry
from hotswap.validate import Override, Policy, check_entries, check_entry, check_values


def entry(name: str, t: torch.Tensor, **changes: object) -> TensorEntry:
    buf = codec.as_bytes(t)
    s = codec.stats(t)
    fields: dict[str, object] = {
        "name": name,
        "dtype": codec.dtype_name(t.dtype),
        "shape": tuple(t.shape),
        "nbytes": len(buf),
        "digest": codec.digest(buf),
        "chunk_bytes": 4096,
        "norm": s.norm,
        "max_abs": s.max_abs,
    }
    fields.update(changes)
    return TensorEntry(**fields)  # type: ignore[arg-type]


def values(
    name: str, new: torch.Tensor, old: torch.Tensor, policy: Policy | None = None
) -> list[str]:
    policy = policy or Policy()
    return check_values(name, entry(name, new), new, old, policy.rules_for(name))


OLD = torch.full((4, 4), 1.0)


# -- policy -------------------------------------------------------------------


def test_default_policy() -> None:
    r = Policy().rules_for("any.name")
    assert (r.check_finite, r.check_norm, r.norm_ratio, r.max_relative_change) == (
        True,
        True,
        (0.1, 10.0),
        None,
    )
    assert Policy().unknown_tensors == "reject"


def test_overrides_apply_in_order_later_wins_and_none_switches_off() -> None:
    def v1(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
        return None

    p = Policy(
        validators=[v1],
        overrides={
            "layers.*": Override(norm_ratio=(0.5, 2.0), max_relative_change=0.3),
            "layers.0.*": Override(norm_ratio=None, validators=[]),
            "*.bias": Override(check_finite=False),
        },
    )
    assert p.rules_for("head.weight").norm_ratio == (0.1, 10.0)
    assert p.rules_for("head.weight").validators == (v1,)
    r1 = p.rules_for("layers.1.weight")
    assert (r1.norm_ratio, r1.max_relative_change, r1.check_finite) == ((0.5, 2.0), 0.3, True)
    r0 = p.rules_for("layers.0.bias")
    assert (r0.norm_ratio, r0.max_relative_change, r0.check_finite, r0.validators) == (
        None,
        0.3,
        False,
        (),
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"norm_ratio": (5.0, 1.0)},
        {"norm_ratio": (-1.0, 1.0)},
        {"max_relative_change": 0},
        {"unknown_tensors": "maybe"},
        {"missing_tensors": "ignore"},
        {"overrides": {"x": {"nonsense": 1}}},
        {"no_such_field": True},
    ],
)
def test_bad_policy_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Policy(**fields)  # type: ignore[arg-type]


# -- metadata -----------------------------------------------------------------


def test_check_entry_names_each_mismatch() -> None:
    live = torch.zeros(4, 4)
    assert check_entry(entry("a", torch.zeros(4, 4)), live) == []
    assert check_entry(entry("a", torch.zeros(4, 4)), None) == [validate.UNKNOWN]
    assert check_entry(entry("a", torch.zeros(4, 8)), live) == [
        "shape [4, 8] differs from the live tensor's [4, 4]"
    ]
    assert check_entry(entry("a", torch.zeros(4, 4, dtype=torch.float16)), live) == [
        "dtype F16 differs from the live tensor's F32"
    ]
    assert check_entry(entry("a", torch.zeros(2, dtype=torch.int64)), live) == [
        "dtype I64 differs from the live tensor's F32",
        "shape [2] differs from the live tensor's [4, 4]",
    ]


def test_check_entries_collects_every_failing_tensor() -> None:
    live = {"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.zeros(3)}
    entries = [
        entry("a", torch.zeros(3)),
        entry("b", torch.zeros(4)),
        entry("c", torch.zeros(3, dtype=torch.float64)),
        entry("x", torch.zeros(3)),
    ]
    reasons, ignored = check_entries(entries, live, [], Policy())
    assert sorted(reasons) == ["b", "c", "x"]
    assert reasons["x"] == [validate.UNKNOWN]
    assert ignored == set()
    reasons, ignored = check_entries(entries, live, [], Policy(unknown_tensors="ignore"))
    assert sorted(reasons) == ["b", "c"] and ignored == {"x"}


def test_tied_names_must_get_identical_bytes() -> None:
    w = torch.zeros(3)
    live = {"emb": w, "out": w}
    same = [entry("emb", torch.ones(3)), entry("out", torch.ones(3))]
    assert check_entries(same, live, [["emb", "out"]], Policy())[0] == {}
    split = [entry("emb", torch.ones(3)), entry("out", torch.full((3,), 2.0))]
    reasons, _ = check_entries(split, live, [["emb", "out"]], Policy())
    assert reasons == {
        "out": [
            "shares storage with 'emb' in the live model, but the version gives it different bytes"
        ]
    }


def test_missing_tensors_are_named_unless_the_policy_keeps_them() -> None:
    w = torch.zeros(3)
    live = {"a": w, "b": torch.zeros(3), "emb": w, "empty": torch.zeros(0)}
    ties = [["a", "emb"]]
    assert Policy().missing_tensors == "reject"
    assert validate.check_missing({"a", "b", "emb"}, live, ties, Policy()) == {}
    # "emb" shares storage with the published "a": the version writes its bytes too.
    assert validate.check_missing({"a", "b"}, live, ties, Policy()) == {}
    assert validate.check_missing({"b", "x"}, live, ties, Policy()) == {
        "a": [validate.MISSING],
        "emb": [validate.MISSING],
    }
    assert validate.check_missing({"b"}, live, ties, Policy(missing_tensors="keep")) == {}
    assert validate.MISSING == (
        "missing: the version has no tensor of this name and the model would keep its own "
        "(publish it, or set Policy(missing_tensors='keep'))"
    )


# -- values -------------------------------------------------------------------


def test_plausible_update_passes() -> None:
    assert values("w", OLD * 1.1, OLD) == []


def test_nan_is_counted_and_named() -> None:
    new = OLD.clone()
    new[0, 0] = float("nan")
    new[1, 1] = float("inf")
    assert values("w", new, OLD) == ["2 of 16 values are not finite (NaN or inf)"]


def test_nan_in_half_precision_is_found() -> None:
    new = OLD.to(torch.bfloat16)
    new[2, 2] = float("nan")
    assert values("w", new, OLD.to(torch.bfloat16)) == [
        "1 of 16 values are not finite (NaN or inf)"
    ]


def test_infinity_allowed_by_override_still_needs_the_stated_norm() -> None:
    mask = torch.triu(torch.full((4, 4), float("-inf")), diagonal=1)
    p = Policy(overrides={"mask": Override(check_finite=False)})
    assert values("mask", mask, torch.zeros(4, 4), p) == []
    lying = entry("mask", mask, norm=1.0)
    assert check_values("mask", lying, mask, torch.zeros(4, 4), p.rules_for("mask")) == [
        "norm inf differs from the manifest's 1"
    ]


def test_norm_that_overflows_float64_is_refused() -> None:
    new = torch.full((4,), 1e300, dtype=torch.float64)
    assert not math.isfinite(codec.stats(new).norm)  # finite values, squares overflow
    assert values("w", new, torch.ones(4, dtype=torch.float64)) == ["its L2 norm overflows float64"]


def test_norm_must_match_the_manifest() -> None:
    new = OLD * 1.1
    stated = entry("w", new, norm=codec.stats(new).norm * 1.001)
    assert check_values("w", stated, new, OLD, Policy().rules_for("w")) == [
        "norm 4.4 differs from the manifest's 4.4044 (the bytes do not match the "
        "published statistics)"
    ]
    close = entry("w", new, norm=codec.stats(new).norm * (1 + 1e-8))
    assert check_values("w", close, new, OLD, Policy().rules_for("w")) == []


@pytest.mark.parametrize(("factor", "ratio"), [(100.0, "100"), (0.01, "0.01"), (0.0, "0")])
def test_norm_ratio_out_of_bounds(factor: float, ratio: str) -> None:
    got = values("w", OLD * factor, OLD)
    assert len(got) == 1
    assert got[0].startswith(f"norm ratio new/old {ratio} is outside [0.1, 10]")


def test_norm_ratio_bounds_are_inclusive_and_overridable() -> None:
    assert values("w", OLD * 10, OLD) == []
    assert values("w", OLD * 100, OLD, Policy(norm_ratio=None)) == []
    p = Policy(overrides={"emb*": Override(norm_ratio=(0.5, 200.0))})
    assert values("emb.weight", OLD * 100, OLD, p) == []
    assert values("other", OLD * 100, OLD, p) != []


def test_zero_live_norm_has_no_ratio() -> None:
    # Zero-initialised biases and LoRA B matrices must be able to learn.
    assert values("b", OLD, torch.zeros(4, 4)) == []


def test_integer_tensors_have_no_ratio() -> None:
    steps = torch.tensor([1000], dtype=torch.int64)
    assert values("steps", steps, torch.tensor([1], dtype=torch.int64)) == []


def test_max_relative_change() -> None:
    p = Policy(max_relative_change=0.5)
    assert values("w", OLD * 1.4, OLD, p) == []
    got = values("w", OLD * 1.6, OLD, p)
    assert got == ["relative change ||new-old||/||old|| 0.6 exceeds 0.5"]
    assert validate.relative_change(OLD * 1.6, OLD) == pytest.approx(0.6)


def test_validators_run_and_their_failures_are_reasons() -> None:
    calls: list[str] = []

    def positive(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
        calls.append(name)
        return None if bool((new > 0).all()) else "has non-positive values"

    def broken(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
        raise RuntimeError("boom")

    p = Policy(validators=[positive, broken])
    assert values("w", -OLD, OLD, p) == [
        "validator positive: has non-positive values",
        "validator broken raised RuntimeError: boom",
    ]
    assert calls == ["w"]


def test_validators_still_run_for_non_finite_tensors() -> None:
    seen: list[str] = []

    def record(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
        seen.append(name)
        return None

    new = OLD.clone()
    new[0, 0] = float("nan")
    assert values("w", new, OLD, Policy(validators=[record])) == [
        "1 of 16 values are not finite (NaN or inf)"
    ]
    assert seen == ["w"]


def test_rejection_is_one_line_and_keeps_every_reason() -> None:
    reasons = {f"t{i}": [f"r{i}", "x"] for i in range(7)}
    e = validate.rejection("m", 3, reasons)
    assert isinstance(e, ValidationError)
    assert "\n" not in str(e)
    assert str(e).startswith("model 'm' v3 rejected, 7 tensor(s) failed validation: 't0': r0; x")
    assert str(e).endswith("| and 2 more")
    assert e.reasons == reasons


def test_stated_old_norm_replaces_computing_it() -> None:
    rules = Policy(max_relative_change=0.5).rules_for("w")
    new = OLD * 3
    # The live tensor's norm as its manifest states it: no pass over ``old``.
    stated = codec.norm(OLD)
    assert check_values("w", entry("w", new), new, OLD, rules, old_norm=stated) == (
        check_values("w", entry("w", new), new, OLD, rules)
    )
    # What it says is what is used: a stated norm of 0.3 (not 4) puts new/old at 40.
    got = check_values("w", entry("w", new), new, OLD, rules, old_norm=0.3)
    assert got == [
        "norm ratio new/old 40 is outside [0.1, 10] (norm 0.3 -> 12)",
        "relative change ||new-old||/||old|| 26.6667 exceeds 0.5",
    ]


def test_stated_old_norm_of_zero_or_non_finite_has_no_ratio() -> None:
    rules = Policy().rules_for("w")
    new = OLD * 100
    for stated in (0.0, math.inf, math.nan):
        assert check_values("w", entry("w", new), new, OLD, rules, old_norm=stated) == []


def test_validation_uses_the_codec_norm() -> None:
    # The agent's recomputed norm and the publisher's stated one are one function.
    t = torch.randn(1 << 20).bfloat16()
    assert check_values("w", entry("w", t), t, t, Policy().rules_for("w")) == []
    assert not hasattr(validate, "norm")


def test_an_allowed_cast_pair_passes_the_metadata_check_and_others_do_not() -> None:
    live = torch.zeros(4, 4, dtype=torch.bfloat16)
    published = entry("a", torch.zeros(4, 4))
    assert check_entry(published, live) == ["dtype F32 differs from the live tensor's BF16"]
    assert check_entry(published, live, {("F32", "BF16")}) == []
    # A pair allows one direction only, and never a shape change.
    assert check_entry(published, live, {("BF16", "F32")}) == [
        "dtype F32 differs from the live tensor's BF16"
    ]
    wide = entry("a", torch.zeros(4, 8))
    assert check_entry(wide, live, {("F32", "BF16")}) == [
        "shape [4, 8] differs from the live tensor's [4, 4]"
    ]
    policy = Policy(cast=[("F32", "BF16")])
    assert check_entries([published], {"a": live}, [], policy) == ({}, set())


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_min_coverage_is_a_share(bad: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="min_coverage"):
        Policy(min_coverage=bad)


def test_a_coverage_refusal_says_only_that() -> None:
    reasons = {validate.COVERAGE: ["0 of 3 live tensors matched"], "x": ["unknown"]}
    error = validate.rejection("m", 4, reasons)
    assert str(error) == "model 'm' v4 rejected: 0 of 3 live tensors matched"
    assert error.reasons == {validate.COVERAGE: ["0 of 3 live tensors matched"]}


def test_values_with_no_manifest_entry_skip_the_norm_comparison() -> None:
    new, old = torch.ones(4), torch.ones(4) * 0.9
    rules = Policy().rules_for("w")
    assert check_values("w", None, new, old, rules) == []
    assert check_values("w", None, new * 100, old, rules)[0].startswith("norm ratio new/old ")
