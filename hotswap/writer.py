"""The agent's writes to the live tensors, one at a time: applies (with what they replace
kept for a revert, and the post-apply probes) and reverts.

An apply keeps the bytes it replaces first (``hotswap.undo``, outside the
writer lock: the agent is their only writer), then copies under the lock
and runs the probes (``hotswap.postapply``) there; a failed probe puts the
kept bytes back before the lock is released, so no reader ever sees the
version. ``revert`` puts the last apply's kept bytes back under the lock,
without Redis. Both hold one mutex from planning the copies to recording
the result: a sparse patch is scattered only onto the bytes it was planned
against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hotswap import postapply, undo, validate
from hotswap.copies import apply, pairs, patched
from hotswap.errors import HotswapError, ValidationError
from hotswap.gate import Gate
from hotswap.postapply import Probe
from hotswap.priority import Foreground
from hotswap.runstate import Rejection, RunState, Undo
from hotswap.staging import LiveModel, Staged


@dataclass(frozen=True)
class Written:
    """What an apply did: the writer lock's seconds, the tensors patched, or why the
    version was refused instead (a probe, or no room to keep what it replaces)."""

    paused: float = 0.0
    patched: int = 0
    refused: str | None = None


class Writer:
    """Applies and reverts for one agent (see the module docstring).

    Args:
        model_name: named in messages.
        live: the live tensors.
        state: what runs (``RunState``).
        gate: the readers-writer lock of the live tensors.
        probes: run on ``model`` after each copy, under the lock.
        revert_bytes: host bytes kept of what a version replaced (None: one
            version's, whatever their size; 0: none, and probed versions are refused).
    """

    def __init__(
        self,
        model_name: str,
        live: LiveModel,
        state: RunState,
        gate: Gate,
        *,
        probes: Sequence[Probe] = (),
        model: Any = None,
        revert_bytes: int | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        self.model_name, self.live, self.state, self._gate = model_name, live, state, gate
        self.probes, self.model, self.revert_bytes = (
            postapply.immediate(probes),
            model,
            revert_bytes,
        )
        # Probations need the replaced bytes kept too: a failure reverts.
        self._keeps = bool(self.probes or postapply.probations(probes))
        self._writes = threading.Lock()
        # Writes under the writer lock run at the serving threads' priority.
        self._foreground = foreground or Foreground("unused")
        # Seconds the last revert held the writer lock (bench.revert reads it).
        self.last_revert_seconds = 0.0

    def apply(self, staged: Staged, digest: str) -> Written:
        """Copy ``staged`` into the live tensors under the writer lock and record it, unless a
        probe fails (then the live tensors are as they were, and ``refused`` says why)."""
        with self._writes:
            # A patched tensor writes only its changed elements where what runs is its base.
            copies = pairs(staged, self.live, self.state.basis().digests)
            saved = undo.save(copies, self.revert_bytes, self._reusable())
            if saved is None and self._keeps:
                return Written(
                    refused=f"its {undo.needed(copies)} replaced bytes exceed the revert budget "
                    f"(HOTSWAP_REVERT_BYTES={self.revert_bytes}): a failed probe could not put "
                    "them back"
                )

            def locked() -> tuple[float, str | None]:
                with self._gate.writing():
                    started = time.perf_counter()
                    apply(copies)
                    failed = postapply.run(self.probes, self.model) if self.probes else None
                    if failed is None:
                        self.state.record_applied(staged, digest, saved)
                    else:
                        assert saved is not None  # probes run only where the bytes were kept
                        undo.restore(saved)
                    return time.perf_counter() - started, failed

            paused, failed = self._foreground.run(locked)
        return Written(paused, patched(copies), failed)

    def last_applied(self) -> str | None:
        """The manifest digest of the last apply whose replaced bytes are kept."""
        last = self.state.undo()
        return None if last is None else last.manifest_digest

    def _reusable(self) -> dict[int, torch.Tensor]:
        """The whole-tensor copies the last apply kept: written over by the next one."""
        last = self.state.undo()
        return {} if last is None else undo.copies_of(last.saved)

    def revert(
        self,
        why: str = "by Agent.revert(), from host memory",
        only: str | None = None,
        *,
        refuse: bool = True,
    ) -> tuple[Undo, ValidationError] | None:
        """Put back what the last apply replaced, under the writer lock, from host memory;
        its version counts as refused from now on, for ``why`` (unless ``refuse`` is
        False: a rollout took it back). With ``only`` (a manifest digest), only while
        that version is the last applied (None otherwise).

        Raises:
            HotswapError: nothing can be reverted (without ``only``).
        """
        with self._writes:
            last = self.state.undo()
            if only is not None and (last is None or last.manifest_digest != only):
                return None
            if last is None:
                raise HotswapError(
                    f"model {self.model_name!r}: nothing to revert (no version applied since "
                    "the agent started or last reverted, or the last one's replaced bytes "
                    "exceeded HOTSWAP_REVERT_BYTES)"
                )
            error = validate.rejection(self.model_name, last.version, {"<revert>": [why]})
            refused = Rejection(last.lineage, error, last.manifest_digest) if refuse else None

            def locked() -> None:
                with self._gate.writing():
                    started = time.perf_counter()
                    undo.restore(last.saved)
                    self.state.record_reverted(last, refused)
                    self.last_revert_seconds = time.perf_counter() - started

            self._foreground.run(locked)
        return last, error
