"""The value checks of a fetched version, and the casts a policy allows.

Imports no Redis. ``check_staged`` runs ``validate.check_values`` over every
changed tensor of a staged version. Where the published dtype differs from
the live one (a pair ``Policy.cast`` allows; the metadata check refused the
others), the bytes as published were already checked against their digest;
then the published values are checked (finite, norm as the manifest states
it), converted, the conversion is checked (a finite value must stay finite:
fp32 beyond the range of fp16 overflows), and the remaining checks (norm
ratio, relative change, validators) run on the converted values, which are
what the model will hold. For content this agent ran before under the same
name (``ranbefore``), the relative checks are skipped: a rollback is a return,
not a jump. A tensor staged from a sparse delta of what runs (``Staged.patches``)
is checked from its changed elements where ``patchcheck.passes`` can vouch
for it, fully otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from hotswap import codec, patchcheck, validate
from hotswap.manifest import TensorEntry
from hotswap.ranbefore import RanBefore

if TYPE_CHECKING:
    from hotswap.staging import LiveModel, Staged


def _non_finite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t.to(torch.float32) if t.itemsize < 4 else t)).sum())


def cast_checked(
    name: str,
    entry: TensorEntry,
    published: torch.Tensor,
    live: torch.Tensor,
    rules: validate.Rules,
    *,
    old_norm: float | None = None,
) -> tuple[torch.Tensor | None, list[str]]:
    """``published`` converted to ``live``'s dtype, and the reasons to refuse it.

    Returns ``(None, reasons)`` when the published values already fail.

    Example:
        >>> rules = validate.Policy(norm_ratio=None).rules_for("w")
        >>> big = torch.tensor([1.0, 1e6])
        >>> e = TensorEntry("w", "F32", (2,), 8, "0" * 64, 8, codec.norm(big), 1e6)
        >>> cast_checked("w", e, big, torch.zeros(2, dtype=torch.float16), rules)[1]
        ['casting F32 to F16 overflows: 1 of 2 values become infinite']
    """
    as_published = dataclasses.replace(
        rules, norm_ratio=None, max_relative_change=None, validators=()
    )
    reasons = validate.check_values(name, entry, published, published, as_published)
    if reasons:
        return None, reasons
    new = published.to(live.dtype)
    if new.is_floating_point():
        overflow = _non_finite(new) - _non_finite(published)
        if overflow > 0:
            live_dtype = codec.dtype_name(live.dtype)
            return None, [
                f"casting {entry.dtype} to {live_dtype} overflows: {overflow} of "
                f"{new.numel()} values become infinite"
            ]
    return new, validate.check_values(name, None, new, live, rules, old_norm=old_norm)


def check_staged(
    staged: Staged,
    live: LiveModel,
    policy: validate.Policy,
    old_norms: Mapping[str, float],
    ran: RanBefore | None = None,
) -> dict[str, list[str]]:
    """Reasons per changed tensor of ``staged`` (converted in place where cast).

    A tensor whose digest ``ran`` holds for its name (content this agent
    validated and ran before) skips the norm ratio and relative change checks.

    A tensor that passes with its norm checked against the manifest is noted
    in ``staged.norms``; a cast one is not: the manifest states the norm of
    the published values, not of the converted ones the model will run.
    """
    reasons: dict[str, list[str]] = {}
    published: dict[str, torch.Tensor] = {}
    for name, entry in staged.plan.changed.items():
        canon = live.canonical[name]
        if canon not in staged.tensors:
            continue
        rules = policy.rules_for(name)
        if ran is not None and ran.seen(name, entry.digest):
            rules = dataclasses.replace(rules, norm_ratio=None, max_relative_change=None)
        target = live.tensors[canon]
        new = published.setdefault(canon, staged.tensors[canon])
        cast = new.dtype != target.dtype
        if cast:
            converted, found = cast_checked(
                name, entry, new, target, rules, old_norm=old_norms.get(name)
            )
            if converted is not None:
                staged.tensors[canon] = converted
        elif (
            (patch := staged.patches.get(canon)) is not None
            and patch.staged is new
            and patchcheck.passes(
                entry, patch.new, patch.old, rules=rules, old_norm=old_norms.get(name)
            )
        ):
            found = []
            staged.checked_by_patch += 1
        else:
            found = validate.check_values(
                name, entry, new, target, rules, old_norm=old_norms.get(name)
            )
        if found:
            reasons.setdefault(name, []).extend(found)
        elif rules.check_norm and not cast:
            staged.norms[name] = entry.norm
    return reasons
