"""An agent's status record and heartbeat, written from the reporter's own thread.

The thread writes the record whenever it changes (once the change has settled
for ``SETTLE_SECONDS``) and refreshes the heartbeat every ttl/3, so neither
waits for the agent's thread: a notice starts a fetch without a status write
in front of it, and a fetch of one huge tensor does not let the heartbeat
expire. Writes go through ``Store.write_agent_status`` on the store given (the
agent gives one that tries once; the thread tries again later). The schedule
(settling, heartbeat, pause after a failed write) reads an injectable clock.

On a Redis Cluster the record is written again as soon as the client learns
the slot map anew: a failover may have lost the last write (acknowledged by
the old master, never copied to its replica), or left it waiting out the
pause after a failed one, and ``hotswap status`` would lag until the next
change or heartbeat.

With a health callback (``Agent(health=...)``) the reporter's second thread
(``health.HealthWatch``) calls it at start and every ``health_interval``, and
its numbers go into the record (``health``, ``health_at``), where ``hotswap
rollout`` judges canaries. A change of the numbers is written like any other
change; the same numbers again only move ``health_at``, which goes out with
the next write (at the latest the heartbeat).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hotswap import candidates, metrics, status
from hotswap.errors import HotswapError, ValidationError
from hotswap.health import Health, HealthWatch
from hotswap.status import MAX_PROBE_REASON, AgentStatus
from hotswap.store import Store

# Reasons kept in the record: it must stay small enough for ``status.decode``.
MAX_TENSORS = 50
MAX_REASON = 300
# Pause after a refused write before the thread tries again (Redis away).
RETRY_SECONDS = 1.0
# How long the thread lets a change settle before writing it. The states an
# update passes through within this time are written once, as the last, so
# an update shorter than this is not slowed by a write landing in the middle
# of its fetch (what such a write costs: docs/performance.md, "Status writes
# settle"). Longer fetches still show "fetching". An applied version ends the
# wait: once the update is over its record is written at once (a rejection is
# written before waiters wake). It is also how far ``hotswap status`` may lag.
SETTLE_SECONDS = 0.25


def _trim(rejection: dict[str, list[str]]) -> dict[str, list[str]]:
    names = sorted(rejection)[:MAX_TENSORS]
    return {n: [r[:MAX_REASON] for r in rejection[n][:5]] for n in names}


class Reporter:
    """Holds one agent's ``AgentStatus`` and writes it with its heartbeat.

    ``start()`` runs the writing thread; ``close()`` writes the record a last
    time and waits a bounded time for that write. ``flush()`` writes at once
    from the caller's thread (a rejection is recorded before waiters wake).
    ``clock`` (seconds, monotonic) schedules settling and heartbeats; tests
    pass one they move by hand.
    """

    def __init__(
        self,
        store: Store,
        agent_id: str,
        ttl: float,
        log: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        track: str = "stable",
        health: Health | None = None,
        health_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.log = log or logging.getLogger("hotswap.agent")
        self._clock = clock
        # One write at a time, each with the record as it was when it started:
        # an older record can never land after a newer one.
        self._io = threading.Lock()
        self._lock = threading.Lock()
        # Guarded by _lock: the record, whether it changed since the last write,
        # and the schedule (next heartbeat, pause after a failed write).
        self._status = AgentStatus(
            agent_id=agent_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            encodings=candidates.understood(),
            track=track,
        )
        self._dirty = True
        # An applied version is written at once: it is what ``hotswap status`` is for.
        self._outcome = False
        self._next = 0.0
        self._hold = 0.0
        self._wake = threading.Event()
        self._closing = threading.Event()
        # Set by start(), read by close(): the agent calls both from one thread.
        self._thread: threading.Thread | None = None
        self._unwatch: Callable[[], None] | None = None
        self._health = (
            HealthWatch(health, health_interval, self._healthy, self.log) if health else None
        )

    @property
    def status(self) -> AgentStatus:
        """A copy of the current record."""
        with self._lock:
            return replace(self._status, rejection=dict(self._status.rejection))

    def _healthy(self, numbers: dict[str, float] | None, at: float) -> None:
        """Take a health sample: new numbers are a change; the same only move ``health_at``."""
        with self._lock:
            changed = self._status.health != numbers or self._status.health_at is None
            self._status.health, self._status.health_at = numbers, at
            self._dirty = self._dirty or changed
        if changed:
            self._wake.set()

    def update(self, **fields: Any) -> None:
        """Change fields of the record; the thread writes it soon after."""
        if "rejection" in fields:
            fields["rejection"] = _trim(fields["rejection"])
        if "last_error" in fields and fields["last_error"] is not None:
            fields["last_error"] = str(fields["last_error"])[:2000]
        if "last_probe" in fields and fields["last_probe"] is not None:
            fields["last_probe"] = str(fields["last_probe"])[:MAX_PROBE_REASON]
        changed = False
        with self._lock:
            for name, value in fields.items():
                if getattr(self._status, name) != value:
                    setattr(self._status, name, value)
                    changed = True
            self._dirty = self._dirty or changed
        if changed:
            self._wake.set()

    def applied(self, report: ApplyReport, log: logging.Logger) -> None:
        """Record, count and log an applied version (the thread writes the record)."""
        with self._lock:
            count = self._status.applied_count + 1
            self._outcome = True
        self.update(
            state="idle",
            version=report.version,
            lineage=report.lineage,
            manifest_digest=report.manifest_digest,
            last_error=None,
            apply_seconds=report.apply_seconds,
            last_fetched=report.bytes_fetched,
            applied_count=count,
        )
        metrics.applied(
            self.store.model, report.version, report.apply_seconds, report.bytes_fetched
        )
        log.info(
            "model %r: applied v%d (%d tensors, %d by patch, %d bytes fetched, writer lock "
            "%.1f ms)",
            self.store.model,
            report.version,
            report.tensors_changed,
            report.tensors_patched,
            report.bytes_fetched,
            report.apply_seconds * 1000,
        )

    def rejected(
        self,
        version: int,
        error: ValidationError,
        nbytes: int,
        pending: bool,
        log: logging.Logger,
    ) -> None:
        """Record, write, count and log a rejected version."""
        self.update(state="pending" if pending else "idle", **self._refusal(version, error))
        self.beat(log)
        metrics.rejected(self.store.model, nbytes)
        log.error("%s", error)

    def reverted(
        self,
        version: int,
        back: int | None,
        manifest_digest: str | None,
        error: ValidationError,
        log: logging.Logger,
    ) -> None:
        """Record a revert: ``back`` runs again (its manifest's ``manifest_digest``), and
        ``version`` counts as refused. Written when Redis can be reached; never waits."""
        self.update(
            state="idle",
            version=back,
            manifest_digest=manifest_digest,
            **self._refusal(version, error),
        )
        metrics.reverted(self.store.model)
        log.warning("%s", error)

    def _refusal(self, version: int, error: ValidationError) -> dict[str, Any]:
        """The record's fields for one more refused version (and one more probe failure,
        when a probe or a probation refused it)."""
        probe = probe_failure(error)
        with self._lock:
            count = self._status.rejected_count + 1
            recent = status.remember_rejection(self._status.rejected_versions, version)
            probes = self._status.probe_failures + (probe is not None)
        if probe is not None:
            metrics.probe_failed(self.store.model)
        return {
            "last_error": str(error),
            "rejected_version": version,
            "rejected_versions": recent,
            "rejection": error.reasons,
            "rejected_tensors": len(error.reasons),
            "rejected_count": count,
            "probe_failures": probes,
            **({} if probe is None else {"last_probe": f"v{version}: {probe}"}),
        }

    def beat(self, log: logging.Logger) -> None:
        """Write the record now if it changed or the heartbeat is due (not while offline)."""
        if self._due():
            self.flush(log)

    def topology_changed(self) -> None:
        """Write the record again soon, without the pause after a failed write: the
        cluster's slot map changed, and the last write may have gone to a master
        that is gone. Only takes note (it runs inside redis-py's refresh)."""
        with self._lock:
            self._dirty = True
            self._hold = 0.0
        self._wake.set()

    def _due(self) -> bool:
        with self._lock:
            if self._status.state == "disconnected":
                return False
            return self._dirty or self._clock() >= self._next

    def flush(self, log: logging.Logger) -> bool:
        """Write the record and heartbeat now; False (logged at debug) if Redis refused."""
        with self._io:
            with self._lock:
                self._status.updated = time.time()
                data = status.encode(self._status)
                agent_id = self._status.agent_id
                self._dirty = self._outcome = False
                self._next = self._clock() + self.ttl / 3
            try:
                self.store.write_agent_status(agent_id, data, self.ttl)
            except (HotswapError, OSError) as e:
                with self._lock:
                    self._dirty = True
                    self._hold = self._clock() + min(RETRY_SECONDS, self.ttl / 3)
                log.debug("could not write agent status: %s", e)
                return False
        return True

    # -- the writing thread ------------------------------------------------------

    def start(self) -> None:
        """Start the thread that writes changes and heartbeats (idempotent)."""
        if self._thread is None and not self._closing.is_set():
            self._unwatch = self.store.records.watch_topology(self.topology_changed)
            self._thread = threading.Thread(
                target=self._run, name=f"hotswap-reporter-{self.store.model}", daemon=True
            )
            self._thread.start()
            if self._health is not None:
                self._health.start(f"hotswap-health-{self.store.model}")

    def close(self, timeout: float) -> bool:
        """Stop the thread after one last write; True if that write landed within ``timeout``.

        Bounded whatever Redis does: the write is tried once, and a write stuck
        on a frozen server is left to finish (or fail) on the daemon thread.
        """
        done = threading.Event()
        landed = [False]

        def last() -> None:
            with self._lock:
                self._hold = 0.0
            landed[0] = self.flush(self.log)
            done.set()

        deadline = time.monotonic() + timeout
        thread = self._thread
        if self._health is not None:
            self._health.stop()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self._closing.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return False  # stuck in a write to a frozen server: give up on this one
        writer = threading.Thread(target=last, name="hotswap-reporter-last", daemon=True)
        writer.start()
        done.wait(max(0.0, deadline - time.monotonic()))
        return landed[0]

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._idle_seconds())
            self._wake.clear()
            if self._closing.is_set():
                break
            self._settle()
            if self._closing.is_set():
                break
            with self._lock:
                held = self._clock() < self._hold
            if not held and self._due():
                try:
                    self.flush(self.log)
                except Exception:  # pragma: no cover - a bug; the heartbeat must go on
                    self.log.exception("agent status write failed")

    def _settle(self) -> None:
        """Wait up to ``SETTLE_SECONDS`` for a change to settle; an outcome ends the wait."""
        deadline = self._clock() + SETTLE_SECONDS
        while not self._closing.is_set():
            with self._lock:
                if not self._dirty or self._outcome:
                    return
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            if self._wake.wait(remaining):
                self._wake.clear()

    def _idle_seconds(self) -> float:
        """How long the thread may sleep unless woken by a change."""
        now = self._clock()
        with self._lock:
            if self._status.state == "disconnected":
                return self.ttl / 3
            if now < self._hold:
                return self._hold - now
            if self._dirty:
                return 0.0
            return max(0.0, self._next - now)


def probe_failure(error: ValidationError) -> str | None:
    """The reason a post-apply probe or a probation gave, when one refused the version.

    A probe's refusal comes as ``"<probes>": ["probe NAME: ..."]`` (pipeline, after
    ``postapply.run``), a probation's as a revert ``"probation failed: ..."``
    (``probation.Probations``); a revert by hand, or a version refused because its
    replaced bytes exceed the revert budget, is no probe failure.

    Example:
        >>> probe_failure(ValidationError("x", {"<probes>": ["probe loss: 3.1 > 2.5"]}))
        'probe loss: 3.1 > 2.5'
    """
    for why in error.reasons.get("<probes>", []):
        if why.startswith("probe "):
            return why
    for why in error.reasons.get("<revert>", []):
        if why.startswith(PROBATION_FAILED):
            return why
    return None


# How ``probation.Probations`` words the revert a failed probation makes.
PROBATION_FAILED = "probation failed: "


@dataclass(frozen=True)
class ApplyReport:
    """What one applied version cost; passed to ``Agent(on_applied=...)``."""

    version: int
    lineage: str
    tensors_changed: int
    bytes_fetched: int
    fetch_seconds: float
    validate_seconds: float
    apply_seconds: float
    # ``time.monotonic()`` when the fetch began (comparable across processes of
    # one host: a notice's arrival elsewhere tells the latency before it).
    fetch_started: float = 0.0
    # BLAKE3 of the applied manifest's wire bytes: what identifies the content,
    # since one version number can name two manifests (Redis restored from an
    # older snapshot).
    manifest_digest: str | None = None
    # Tensors the writer lock patched (only their changed elements written, from
    # a sparse delta of what ran) instead of copying whole; and those whose value
    # checks read only the changed elements (``hotswap.patchcheck``).
    tensors_patched: int = 0
    tensors_validated_by_patch: int = 0


def agent_id(name: str | None = None) -> str:
    """One agent's id, as a valid key part: host and ``name`` (the same at each start of a
    process that gives itself that name), else host, pid and a random suffix (new each time).

    Example:
        >>> agent_id("web-1") == f"{socket.gethostname()}-web-1"  # doctest: +SKIP
        True
    """
    tail = name if name is not None else f"{os.getpid()}-{secrets.token_hex(3)}"
    # The name is kept whole: a long host name is cut from the left instead.
    raw = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{tail}")
    return raw[-128:]


# Health is re-exported: the agent takes one (``Agent(health=...)``).
__all__ = ["SETTLE_SECONDS", "ApplyReport", "Health", "Reporter", "agent_id", "probe_failure"]
