"""An agent's status record and heartbeat, written on every change and every ttl/3."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from hotswap import metrics, status
from hotswap.errors import HotswapError, ValidationError
from hotswap.status import AgentStatus
from hotswap.store import Store

# Reasons kept in the record: it must stay small enough for ``status.decode``.
MAX_TENSORS = 50
MAX_REASON = 300


def _trim(rejection: dict[str, list[str]]) -> dict[str, list[str]]:
    names = sorted(rejection)[:MAX_TENSORS]
    return {n: [r[:MAX_REASON] for r in rejection[n][:5]] for n in names}


class Reporter:
    """Holds one agent's ``AgentStatus`` and writes it with its heartbeat."""

    def __init__(self, store: Store, agent_id: str, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._status = AgentStatus(agent_id=agent_id, host=socket.gethostname(), pid=os.getpid())
        self._dirty = True
        self._next = 0.0

    @property
    def status(self) -> AgentStatus:
        """A copy of the current record."""
        with self._lock:
            return replace(self._status, rejection=dict(self._status.rejection))

    def update(self, **fields: Any) -> None:
        """Change fields of the record; the next ``beat`` writes it."""
        if "rejection" in fields:
            fields["rejection"] = _trim(fields["rejection"])
        if "last_error" in fields and fields["last_error"] is not None:
            fields["last_error"] = str(fields["last_error"])[:2000]
        with self._lock:
            for name, value in fields.items():
                if getattr(self._status, name) != value:
                    setattr(self._status, name, value)
                    self._dirty = True

    def applied(self, report: ApplyReport, log: logging.Logger, write: bool) -> None:
        """Record, count and log an applied version; ``write`` the record now."""
        with self._lock:
            count = self._status.applied_count + 1
        self.update(
            state="idle",
            version=report.version,
            lineage=report.lineage,
            last_error=None,
            apply_seconds=report.apply_seconds,
            applied_count=count,
        )
        if write:
            self.beat(log)
        metrics.applied(
            self.store.model, report.version, report.apply_seconds, report.bytes_fetched
        )
        log.info(
            "model %r: applied v%d (%d tensors, %d bytes fetched, writer lock %.1f ms)",
            self.store.model,
            report.version,
            report.tensors_changed,
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
        with self._lock:
            count = self._status.rejected_count + 1
        self.update(
            state="pending" if pending else "idle",
            last_error=str(error),
            rejected_version=version,
            rejection=error.reasons,
            rejected_count=count,
        )
        self.beat(log)
        metrics.rejected(self.store.model, nbytes)
        log.error("%s", error)

    def beat(self, log: logging.Logger) -> None:
        """Write the record if it changed or the heartbeat is due."""
        with self._lock:
            due = self._dirty or time.monotonic() >= self._next
            offline = self._status.state == "disconnected"
        if due and not offline:
            self.flush(log)

    def flush(self, log: logging.Logger) -> bool:
        """Write the record and heartbeat now; False (logged at debug) if Redis refused."""
        with self._lock:
            self._status.updated = time.time()
            data = status.encode(self._status)
            self._dirty = False
            self._next = time.monotonic() + self.ttl / 3
        try:
            self.store.write_agent_status(self._status.agent_id, data, self.ttl)
        except HotswapError as e:
            with self._lock:
                self._dirty = True
            log.debug("could not write agent status: %s", e)
            return False
        return True


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


def agent_id() -> str:
    """A fresh id for one agent: host, pid and a random suffix, as a valid key part."""
    raw = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)[-128:]
