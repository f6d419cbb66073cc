"""A patched tensor's value checks from its changed elements only.

``validate.check_values`` reads every element of a new tensor (its norm, its
finiteness) and, for the relative change, of the live one too. For a tensor
staged from a sparse delta of the live bytes (``hotswap.patches``) every
element outside the patch is the live one, so:

* new norm^2 = old norm^2 + sum over the patch of (new^2 - old^2), in float64,
  from the live tensor's known norm (``hotswap.norms``: the norm a trusted
  manifest states for the bytes that run, the one the full ratio check uses);
* the new tensor is finite iff the live one is (a finite known norm says so)
  and the patch's new values are;
* ||new - old|| sums the patch's differences only (widened as
  ``validate.relative_change`` widens them).

``passes`` says True only where the full checks would find nothing: it never
decides a refusal. Anything it cannot vouch for (no known or a non-finite
old norm, user validators, a non-finite value, a value within ``MARGIN`` of a
bound, a norm tolerance below ``MIN_TOLERANCE``, a norm that fell by more than
``MAX_FALL``) returns False and the caller runs ``validate.check_values``, so a
refusal carries the very same reasons the full path gives.

Pure: no Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hotswap.manifest import TensorEntry
from hotswap.patches import PATCHABLE
from hotswap.validate import Rules

# Relative room kept from every bound, for the difference between the norm
# derived here and the one a full pass computes (both float64 sums, in
# another order, the old one from the publisher's own pass).
MARGIN = 1e-6
# Below this ``norm_tolerance`` the full pass decides: a derived norm is not
# the full pass's bit for bit.
MIN_TOLERANCE = 1e-6
# A new norm^2 under this fraction of the old one is decided by a full pass:
# the subtraction would cancel most of the old norm's digits.
MAX_FALL = 1e-2


@dataclass(frozen=True)
class Derived:
    """What the patch gives: the new norm and ``||new - old|| / old_norm``."""

    norm: float
    relative_change: float


def derive(new: torch.Tensor, old: torch.Tensor, old_norm: float) -> Derived | None:
    """A patched tensor's statistics from its changed elements' values ``new`` and
    ``old`` (1-D, the tensor's dtype) and the live tensor's known norm; None where a
    full pass must decide: a value is NaN or infinite (or, in float64, its square
    is), or the norm fell by more than ``MAX_FALL``.

    Example:
        >>> got = derive(torch.tensor([2.0]), torch.tensor([1.0]), 2.0)  # 4 ones, one -> 2
        >>> round(got.norm ** 2, 9), got.relative_change
        (7.0, 0.5)
    """
    n64, o64 = new.detach().to(torch.float64), old.detach().to(torch.float64)
    # Squares of a patchable dtype's finite values sum finitely in float64 (but
    # float64's own): a non-finite sum is a NaN or infinity among them.
    grown, had = float(torch.dot(n64, n64)), float(torch.dot(o64, o64))
    if not (math.isfinite(grown) and math.isfinite(had)):
        return None
    before = old_norm * old_norm
    squares = before + (grown - had)
    if not math.isfinite(squares) or squares < MAX_FALL * before:
        return None
    # Exact for 16- and 32-bit floats; the full check rounds each difference to
    # float32 first, a relative 6e-8 at most, well inside ``MARGIN``.
    diff = n64 - o64  # not in place: ``to`` returns float64 values themselves
    change = math.sqrt(float(torch.dot(diff, diff))) / old_norm
    return Derived(math.sqrt(squares), change)


def passes(
    entry: TensorEntry | None,
    new: torch.Tensor,
    old: torch.Tensor,
    *,
    rules: Rules,
    old_norm: float | None,
) -> bool:
    """True where ``validate.check_values`` of the whole new tensor against the live one
    would return no reason, decided from the patch; False: run the full checks.

    ``new`` and ``old`` are the changed elements' values after and before
    (``patches.Patch``); every other element is unchanged (the digest of the
    result checked that against the signed manifest).

    Example::

        passes(entry, patch.new, patch.old, rules=policy.rules_for(name), old_norm=2.0)
    """
    if (
        entry is None
        or rules.validators
        or old_norm is None
        or not math.isfinite(old_norm)
        or old_norm <= 0
        or new.dtype != old.dtype
        or new.dtype not in PATCHABLE
        or (rules.check_norm and rules.norm_tolerance < MIN_TOLERANCE)
    ):
        return False
    got = derive(new, old, old_norm)
    if got is None:
        return False
    if rules.check_norm and not (
        math.isfinite(entry.norm)
        and abs(got.norm - entry.norm) <= rules.norm_tolerance * entry.norm * (1 - MARGIN) / 2
    ):
        return False
    if rules.norm_ratio is not None:
        low, high = rules.norm_ratio
        ratio = got.norm / old_norm
        if not low * (1 + MARGIN) <= ratio <= high * (1 - MARGIN):
            return False
    limit = rules.max_relative_change
    return limit is None or got.relative_change <= limit * (1 - MARGIN)
