"""Post-apply probes: the user's checks of a version that passed validation, run on the
model with the new weights in place, before any reader sees them.

Validation catches bytes that are wrong (NaN, shapes, norms, digests); a
probe catches weights that are valid but bad: a fixed batch whose outputs
left their bounds, a held-out loss that rose. ``Agent(probes=[...])`` runs
each probe under the writer lock right after the copy; the first that
returns a reason (or raises) fails the version, which is put back from the
bytes kept for revert (``hotswap.undo``) before the lock is released, and
refused with that reason.

Example::

    def loss_did_not_rise(model: torch.nn.Module) -> str | None:
        loss = float(criterion(model(batch), labels))
        return None if loss < 2.5 else f"held-out loss {loss:.3f} >= 2.5"

    agent = Agent(model, "m", probes=[loss_did_not_rise])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Check = Callable[[Any], "str | None"]
"""``(model) -> None | str``: None passes; a string is the reason the version fails."""


@dataclass(frozen=True)
class Probation:
    """A check that needs real traffic: run ``seconds`` after a version is applied (while
    readers serve it), under a read of the model; a failure reverts the version from
    host memory and refuses it, unless a newer one was applied meanwhile.

    Example::

        def error_rate_ok(model: Any) -> str | None:
            return None if errors.rate() < 0.01 else f"error rate {errors.rate():.1%}"

        Agent(model, "m", probes=[outputs_in_bounds, Probation(error_rate_ok, seconds=60)])
    """

    check: Check
    seconds: float


Probe = Check | Probation
"""What ``Agent(probes=...)`` takes: a check run under the writer lock, or a ``Probation``."""

# A reason longer than this is cut: it travels in status records and logs.
MAX_REASON = 500


def name_of(probe: Probe) -> str:
    """How a probe is named in reasons: its function's name, or its type's."""
    check = probe.check if isinstance(probe, Probation) else probe
    return str(getattr(check, "__name__", type(check).__name__))


def immediate(probes: Sequence[Probe]) -> list[Check]:
    """The checks run under the writer lock (not a ``Probation``)."""
    return [p for p in probes if not isinstance(p, Probation)]


def probations(probes: Sequence[Probe]) -> list[Probation]:
    """The checks run once traffic has met a version."""
    return [p for p in probes if isinstance(p, Probation)]


def run(probes: Sequence[Probe], model: Any) -> str | None:
    """The first probe's failure as ``"probe NAME: reason"``, or None when all pass.

    A probe that raises fails with the exception; probes run without autograd.
    """
    for probe in probes:
        check = probe.check if isinstance(probe, Probation) else probe
        try:
            with torch.no_grad():
                said = check(model)
        except Exception as e:  # a probe's own bug fails the version, never the agent
            said = f"raised {type(e).__name__}: {e}"
        if said is not None:
            return f"probe {name_of(probe)}: {str(said)[:MAX_REASON]}"
    return None
