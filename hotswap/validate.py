"""The validation policy and its checks: pure functions over tensors and manifest entries.

A version is checked in two passes. ``check_entries`` and ``check_missing``
look only at the manifest against the live model (names, shapes, dtypes, tied
tensors, live tensors the version leaves out) before any byte is fetched;
``check_values`` looks at each fetched tensor (finite, norm as the manifest
states it, norm ratio, relative change, user validators). Both passes collect
every failing tensor with every reason, so one rejection tells the operator
everything that is wrong with a version.

Per-name rules come from ``Policy.overrides``: ``{glob: Override}``, matched
with ``fnmatch`` in insertion order; every matching glob applies and a later
one wins for the fields it sets (set a field to ``None`` to switch that check
off for the matching names).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hotswap import codec
from hotswap.errors import ConfigError, ValidationError
from hotswap.manifest import TensorEntry

Validator = Callable[[str, torch.Tensor, torch.Tensor], str | None]
"""A user check: ``(name, new, old) -> None`` to pass, or a reason string to reject."""

UNKNOWN = "unknown tensor: the live model has no tensor of this name"
MISSING = (
    "missing: the version has no tensor of this name and the model would keep its own "
    "(publish it, or set Policy(missing_tensors='keep'))"
)
# The subject of a rejection for too few live names matched (not a tensor).
COVERAGE = "<coverage>"
# Rejections of a whole version rather than of tensors, by subject, as messages name them
# (the subjects of ``looks.Refused``, ``intake.NAMES``, ``transform.TRANSFORM``).
WHOLE = {
    "<manifest>": "the manifest's signature or format",
    "<signed head>": "the signed head record",
    "<names>": "the agent's name map",
    "<transform>": "the agent's transform",
    "<probes>": "a post-apply probe",
    "<revert>": "reverted",
}
# Dtypes an agent may cast between when the policy allows the pair: the
# floating-point ones whose conversion needs no scale.
CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})


def _check_ratio(value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is not None and not (0 <= value[0] <= value[1]):
        raise ValueError(f"norm_ratio bounds {value} must satisfy 0 <= low <= high")
    return value


def _check_casts(value: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for pair in value:
        bad = [d for d in pair if d not in CASTABLE]
        if bad:
            raise ValueError(
                f"cast {pair} names {bad[0]!r}: casts are between {', '.join(sorted(CASTABLE))}"
            )
    return value


class Override(BaseModel):
    """Rules for the tensors whose names match one glob; unset fields keep the policy's.

    Used as a value of ``Policy.overrides``. A field set to ``None`` switches
    that check off for the matching names; a field left unset keeps what the
    policy (or an earlier matching glob) says.

    Args:
        check_finite: refuse NaN and infinity (``None``: off).
        check_norm: refuse a norm that differs from the manifest's (``None``: off).
        norm_ratio: bounds of new/old L2 norm (``None``: no bound).
        max_relative_change: bound of ``||new - old|| / ||old||`` (``None``: off).
        validators: callables ``(name, new, old) -> None | reason``; replace the
            policy's for these names (``None`` or ``[]``: none).

    Raises:
        pydantic.ValidationError: an unknown field, ``norm_ratio`` bounds not
            ``0 <= low <= high``, or ``max_relative_change <= 0``.

    Example:
        >>> from hotswap import Override, Policy
        >>> policy = Policy(overrides={"*.bias": Override(norm_ratio=None)})
        >>> policy.rules_for("fc.bias").norm_ratio is None
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    check_finite: bool | None = None
    check_norm: bool | None = None
    norm_ratio: tuple[float, float] | None = None
    max_relative_change: float | None = Field(default=None, gt=0)
    validators: list[Validator] | None = None

    _ratio = field_validator("norm_ratio")(_check_ratio)


class Policy(BaseModel):
    """What a version must satisfy before an agent applies it.

    Args:
        check_finite: refuse NaN and infinity in floating-point tensors.
        check_norm: refuse a tensor whose recomputed L2 norm differs from the
            manifest's by more than ``norm_tolerance`` (relative).
        norm_tolerance: the relative difference ``check_norm`` allows.
        norm_ratio: bounds of new/old L2 norm for floating-point tensors
            (``None``: no bound). A live tensor whose norm is 0 (zero-initialised
            biases, LoRA B matrices) has no ratio and passes this check.
        max_relative_change: bound of ``||new - old|| / ||old||`` (``None``: off).
            Both relative checks spare a tensor that returns to content this
            agent applied before under that name (``hotswap.ranbefore``: a
            rollback); a restarted agent remembers none.
        unknown_tensors: what to do with a name the live model lacks.
        min_coverage: the least share of the live model's tensor names a
            version must reach (after the agent's name map; a tied twin counts)
            to be applied. A version that reaches none is refused whatever
            this says: it would change nothing and report a new version.
        cast: ``(published dtype, live dtype)`` pairs an agent may convert,
            e.g. ``[("F32", "BF16")]`` for a bf16 server of fp32 checkpoints
            (floating-point dtypes only). The digest is checked over the bytes
            as published; a cast that overflows is refused, and the other
            checks run on the cast values. Unlisted pairs are refused.
        missing_tensors: what to do with a live tensor the version leaves out:
            ``"reject"`` the version, or ``"keep"`` the live values (agents that
            ran different versions then hold different bytes for it). A live
            tensor that shares storage with a published one is not missing.
        validators: callables ``(name, new, old) -> None | reason``.
        overrides: ``{glob: Override}`` per-name changes to the rules above,
            matched in insertion order; every matching glob applies and a
            later one wins for the fields it sets.

    Raises:
        pydantic.ValidationError: an unknown field or an invalid value. An
            ``Agent`` given a mapping instead raises ``ConfigError``.

    Example:
        >>> from hotswap import Override, Policy
        >>> policy = Policy(
        ...     norm_ratio=(0.5, 2.0),
        ...     max_relative_change=0.5,
        ...     overrides={"*.bias": Override(max_relative_change=None)},
        ... )
        >>> policy.rules_for("fc.weight").max_relative_change
        0.5
        >>> policy.rules_for("fc.bias").max_relative_change is None
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    check_finite: bool = True
    check_norm: bool = True
    norm_tolerance: float = Field(default=1e-6, ge=0)
    norm_ratio: tuple[float, float] | None = (0.1, 10.0)
    max_relative_change: float | None = Field(default=None, gt=0)
    unknown_tensors: Literal["reject", "ignore"] = "reject"
    missing_tensors: Literal["reject", "keep"] = "reject"
    # Half: a checkpoint of another architecture that shares a few generic
    # names (``*.bias``) must not pass for the model's own.
    min_coverage: float = Field(default=0.5, ge=0, le=1)
    cast: list[tuple[str, str]] = Field(default_factory=list)
    validators: list[Validator] = Field(default_factory=list)
    overrides: dict[str, Override] = Field(default_factory=dict)

    _ratio = field_validator("norm_ratio")(_check_ratio)
    _casts = field_validator("cast")(_check_casts)

    def rules_for(self, name: str) -> Rules:
        """The rules that apply to one tensor name, overrides resolved."""
        fields: dict[str, object] = {
            "check_finite": self.check_finite,
            "check_norm": self.check_norm,
            "norm_ratio": self.norm_ratio,
            "max_relative_change": self.max_relative_change,
            "validators": tuple(self.validators),
        }
        for pattern, override in self.overrides.items():
            if fnmatchcase(name, pattern):
                for key in override.model_fields_set:
                    value = getattr(override, key)
                    if key == "validators":
                        value = tuple(value or ())
                    elif key in ("check_finite", "check_norm") and value is None:
                        value = False
                    fields[key] = value
        return Rules(
            check_finite=bool(fields["check_finite"]),
            check_norm=bool(fields["check_norm"]),
            norm_ratio=fields["norm_ratio"],  # type: ignore[arg-type]
            max_relative_change=fields["max_relative_change"],  # type: ignore[arg-type]
            validators=fields["validators"],  # type: ignore[arg-type]
            norm_tolerance=self.norm_tolerance,
        )


def as_policy(policy: Policy | Mapping[str, Any] | None) -> Policy:
    """A Policy from a Policy, a mapping of its fields, or None (the defaults)."""
    if policy is None or isinstance(policy, Policy):
        return policy or Policy()
    try:
        return Policy.model_validate(policy)
    except pydantic.ValidationError as e:
        raise ConfigError(f"invalid validation policy: {e}".splitlines()[0]) from e


@dataclass(frozen=True)
class Rules:
    """The resolved checks for one tensor."""

    check_finite: bool
    check_norm: bool
    norm_ratio: tuple[float, float] | None
    max_relative_change: float | None
    validators: tuple[Validator, ...]
    norm_tolerance: float


def _shape(shape: Iterable[int]) -> list[int]:
    return [int(d) for d in shape]


def check_entry(
    entry: TensorEntry, live: torch.Tensor | None, casts: Collection[tuple[str, str]] = ()
) -> list[str]:
    """Metadata reasons to refuse one manifest entry (the live tensor is None if unknown);
    ``casts``: the (published, live) dtype pairs the policy allows."""
    if live is None:
        return [UNKNOWN]
    reasons = []
    live_dtype = codec.dtype_name(live.dtype)
    if entry.dtype != live_dtype and (entry.dtype, live_dtype) not in casts:
        reasons.append(f"dtype {entry.dtype} differs from the live tensor's {live_dtype}")
    if _shape(entry.shape) != _shape(live.shape):
        reasons.append(
            f"shape {_shape(entry.shape)} differs from the live tensor's {_shape(live.shape)}"
        )
    return reasons


def check_entries(
    entries: Iterable[TensorEntry],
    live: Mapping[str, torch.Tensor],
    ties: Iterable[Iterable[str]],
    policy: Policy,
) -> tuple[dict[str, list[str]], set[str]]:
    """Check a manifest against the live model before fetching anything.

    ``ties`` lists groups of live names that share one storage: a version must
    give them identical bytes, or they could not stay tied.

    Returns ``(reasons, ignored)``: reasons per failing tensor, and the unknown
    names the policy says to ignore.
    """
    reasons: dict[str, list[str]] = {}
    ignored: set[str] = set()
    by_name: dict[str, TensorEntry] = {}
    casts = set(policy.cast)
    for entry in entries:
        by_name[entry.name] = entry
        tensor = live.get(entry.name)
        if tensor is None and policy.unknown_tensors == "ignore":
            ignored.add(entry.name)
            continue
        found = check_entry(entry, tensor, casts)
        if found:
            reasons[entry.name] = found
    for group in ties:
        names = [n for n in group if n in by_name]
        if len({by_name[n].digest for n in names}) > 1:
            first = names[0]
            for name in names[1:]:
                if by_name[name].digest != by_name[first].digest:
                    reasons.setdefault(name, []).append(
                        f"shares storage with {first!r} in the live model, "
                        "but the version gives it different bytes"
                    )
    return reasons, ignored


def check_missing(
    published: Iterable[str],
    live: Mapping[str, torch.Tensor],
    ties: Iterable[Iterable[str]],
    policy: Policy,
) -> dict[str, list[str]]:
    """Live tensors a version leaves out, each with its reason (none if the policy keeps them).

    Applying such a version would leave the model's own bytes in place: two
    agents reporting the same version could then hold different weights.
    A live name tied to a published one is covered (the version writes their
    one storage; Hugging Face checkpoints leave out a tied ``lm_head.weight``),
    and an empty tensor holds no bytes to differ.

    Returns:
        ``{name: [MISSING]}`` for every live name not covered, in live order.
    """
    if policy.missing_tensors == "keep":
        return {}
    covered = set(published)
    for group in ties:
        names = set(group)
        if covered & names:
            covered |= names
    return {name: [MISSING] for name, t in live.items() if name not in covered and t.numel() > 0}


def _floating(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and codec.dtype_name(t.dtype) != "F4_E2M1_X2"


def _non_finite(t: torch.Tensor) -> int:
    if t.dtype in (torch.float16, torch.bfloat16) or t.dtype.itemsize == 1:
        t = t.to(torch.float32)
    elif t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    return int((~torch.isfinite(t)).sum())


def _same_non_finite(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _g(x: float) -> str:
    return f"{x:.6g}"


def check_values(
    name: str,
    entry: TensorEntry | None,
    new: torch.Tensor,
    old: torch.Tensor,
    rules: Rules,
    *,
    old_norm: float | None = None,
) -> list[str]:
    """Reasons to refuse one fetched tensor ``new`` replacing the live ``old``.

    ``old_norm``: the live tensor's norm as the manifest it was applied from
    states it (checked when it was applied); ``None`` computes it from ``old``.
    ``entry`` None: no manifest states ``new``'s norm (a tensor a transform
    wrote), so the norm is not compared.
    """
    if entry is None:
        rules = dataclasses.replace(rules, check_norm=False)
    reasons: list[str] = []
    new_norm = codec.norm(new)
    floating = _floating(new)
    if not math.isfinite(new_norm):
        bad = _non_finite(new) if floating else 0
        if not bad:
            reasons.append("its L2 norm overflows float64")
        elif rules.check_finite:
            reasons.append(f"{bad} of {new.numel()} values are not finite (NaN or inf)")
        elif rules.check_norm and entry is not None and not _same_non_finite(new_norm, entry.norm):
            reasons.append(f"norm {_g(new_norm)} differs from the manifest's {_g(entry.norm)}")
        # A ratio or difference of non-finite values says nothing more.
        return reasons + _run_validators(name, new, old, rules)
    if (
        rules.check_norm
        and entry is not None
        and not math.isclose(new_norm, entry.norm, rel_tol=rules.norm_tolerance, abs_tol=1e-30)
    ):
        reasons.append(
            f"norm {_g(new_norm)} differs from the manifest's {_g(entry.norm)} "
            "(the bytes do not match the published statistics)"
        )
    if floating and (rules.norm_ratio is not None or rules.max_relative_change is not None):
        if old_norm is None:
            old_norm = codec.norm(old)
        if old_norm > 0 and math.isfinite(old_norm):
            if rules.norm_ratio is not None:
                low, high = rules.norm_ratio
                ratio = new_norm / old_norm
                if not low <= ratio <= high:
                    reasons.append(
                        f"norm ratio new/old {_g(ratio)} is outside [{_g(low)}, {_g(high)}] "
                        f"(norm {_g(old_norm)} -> {_g(new_norm)})"
                    )
            if rules.max_relative_change is not None:
                change = relative_change(new, old, old_norm)
                if not change <= rules.max_relative_change:
                    reasons.append(
                        f"relative change ||new-old||/||old|| {_g(change)} exceeds "
                        f"{_g(rules.max_relative_change)}"
                    )
    return reasons + _run_validators(name, new, old, rules)


def relative_change(new: torch.Tensor, old: torch.Tensor, old_norm: float | None = None) -> float:
    """``||new - old|| / ||old||`` computed on ``old``'s device in at least float32."""
    wide = torch.promote_types(old.dtype, torch.float32) if not old.is_complex() else old.dtype
    diff = new.to(device=old.device, dtype=wide) - old.to(wide)
    base = codec.norm(old) if old_norm is None else old_norm
    return codec.norm(diff) / base


def _run_validators(name: str, new: torch.Tensor, old: torch.Tensor, rules: Rules) -> list[str]:
    reasons = []
    for check in rules.validators:
        label = getattr(check, "__name__", type(check).__name__)
        try:
            result = check(name, new, old)
        except Exception as e:
            reasons.append(f"validator {label} raised {type(e).__name__}: {e}")
            continue
        if result is not None:
            reasons.append(f"validator {label}: {result}")
    return reasons


def rejection(model: str, version: int, reasons: Mapping[str, list[str]]) -> ValidationError:
    """One ValidationError listing every failing tensor (the message stays one line).

    A version refused for its coverage (``COVERAGE``) says only that: the
    tensors it left unmatched were not looked at one by one.
    """
    if COVERAGE in reasons:
        return ValidationError(
            f"model {model!r} v{version} rejected: {'; '.join(reasons[COVERAGE])}",
            {COVERAGE: list(reasons[COVERAGE])},
        )
    if len(reasons) == 1 and (subject := next(iter(reasons))) in WHOLE:
        # Not a tensor: the manifest, the signed head, a name map or transform.
        why = "; ".join(reasons[subject])
        return ValidationError(
            f"model {model!r} v{version} rejected: {WHOLE[subject]}: {why}",
            {subject: list(reasons[subject])},
        )
    parts = [f"{name!r}: {'; '.join(why)}" for name, why in sorted(reasons.items())]
    shown = " | ".join(parts[:5]) + (f" | and {len(parts) - 5} more" if len(parts) > 5 else "")
    return ValidationError(
        f"model {model!r} v{version} rejected, {len(parts)} tensor(s) failed validation: {shown}",
        {name: list(why) for name, why in reasons.items()},
    )
