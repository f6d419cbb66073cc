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
from typing import Any

import torch

Probe = Callable[[Any], "str | None"]
"""``(model) -> None | str``: None passes; a string is the reason the version fails."""

# A reason longer than this is cut: it travels in status records and logs.
MAX_REASON = 500


def name_of(probe: Probe) -> str:
    """How a probe is named in reasons: its function's name, or its type's."""
    return str(getattr(probe, "__name__", type(probe).__name__))


def run(probes: Sequence[Probe], model: Any) -> str | None:
    """The first probe's failure as ``"probe NAME: reason"``, or None when all pass.

    A probe that raises fails with the exception; probes run without autograd.
    """
    for probe in probes:
        try:
            with torch.no_grad():
                said = probe(model)
        except Exception as e:  # a probe's own bug fails the version, never the agent
            said = f"raised {type(e).__name__}: {e}"
        if said is not None:
            return f"probe {name_of(probe)}: {str(said)[:MAX_REASON]}"
    return None
