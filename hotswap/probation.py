"""Probation: the post-apply checks that need real traffic (``postapply.Probation``).

Each runs once, ``seconds`` after a version is applied, on a timer thread,
under a read of the model (serving goes on beside it). A failure reverts the
version from host memory (``Writer.revert``) and refuses it, but only while
it is still the last version applied: a newer apply (or a revert) since
makes the check moot, and it does nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from hotswap import postapply
from hotswap.errors import ValidationError
from hotswap.gate import Gate
from hotswap.postapply import Probation
from hotswap.runstate import Undo
from hotswap.writer import Writer

log = logging.getLogger("hotswap.agent")


class Probations:
    """The probation timers of one agent.

    Args:
        probations: the checks, each with its window.
        writer: the agent's writes (what runs, and the revert).
        gate: the readers-writer lock (a check reads the model).
        stop: set when the agent stops: pending checks do nothing.
        reverted: reports a revert a failed check made.
    """

    def __init__(
        self,
        probations: Sequence[Probation],
        writer: Writer,
        gate: Gate,
        stop: threading.Event,
        reverted: Callable[[Undo, ValidationError], object],
    ) -> None:
        self.probations = tuple(probations)
        self._writer, self._gate, self._stop, self._reverted = writer, gate, stop, reverted
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def start(self, version: int, digest: str) -> None:
        """Start each check's window for the version just applied (manifest ``digest``)."""
        for probation in self.probations:
            timer = threading.Timer(probation.seconds, self._run, (probation, version, digest))
            timer.name, timer.daemon = f"hotswap-probation-v{version}", True
            with self._lock:
                self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            timer.start()

    def _run(self, probation: Probation, version: int, digest: str) -> None:
        if self._stop.is_set() or self._writer.last_applied() != digest:
            return
        with self._gate.reading():
            failed = postapply.run([probation], self._writer.model)
        if failed is None:
            return
        try:
            done = self._writer.revert(why=f"probation failed: {failed}", only=digest)
        except Exception:  # a timer thread: log, never raise into nothing
            log.exception("reverting v%d after its probation failed", version)
            return
        if done is not None:
            self._reverted(*done)

    def cancel(self) -> None:
        """Stop every pending check (the agent stops)."""
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
