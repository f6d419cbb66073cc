"""The agent: keeps a serving process's model at the head version, safely.

A background thread subscribes to the model's notice channel and polls
``head`` (every ``poll_interval`` and after every reconnect, since pub/sub
drops messages while a client is away; ``delivery.py``). For a notice it
takes the manifest the notice carries, or reads the one it names (for a
poll, head's; ``lookout.py``); it fetches the tensors whose digest differs
from what runs, validates them, and only when every one passed copies them
into the live tensors under the writer side of a readers-writer lock (or at
the serving loop's next ``apply_pending()``). A manifest a notice carried is
compared with the one Redis holds before the version is applied or refused.
The status record and heartbeat are written by the reporter's own thread,
never in front of a fetch. Redis going away delays updates and never stops
the thread or the serving process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal

import tenacity
import torch

from hotswap import keys, validate
from hotswap.connection import RedisClient, connect, operation_retry, retry_from_settings
from hotswap.delivery import Delivery, Stopped
from hotswap.errors import ConfigError, IntegrityError, ValidationError
from hotswap.gate import Gate
from hotswap.hostmem import HostMemory
from hotswap.lookout import Lookout
from hotswap.manifest import Manifest
from hotswap.norms import RunningNorms
from hotswap.reporter import ApplyReport, Reporter, agent_id
from hotswap.settings import HotswapSettings
from hotswap.staging import LiveModel, Staged, Staging, apply, pairs, prepare
from hotswap.store import Store
from hotswap.validate import Policy

log = logging.getLogger("hotswap.agent")
Mode = Literal["auto", "manual"]
# Longest ``stop()`` waits for the final status write (tried once).
FINAL_WRITE_SECONDS = 1.0
# How long ``stop()`` lets the thread finish what it does before closing its sockets.
STOP_GRACE_SECONDS = 1.0


class Agent:
    """Keeps ``model`` at the head version of ``model_name``, in place and all-or-nothing.

    Args:
        model: the live module (or a mapping of name to tensor) to update in place.
        model_name: the model's name in Redis.
        settings: connection and timing settings (default: from the environment).
        connection: a Redis client to use instead of one built from ``settings``.
        policy: the validation ``Policy`` (or a mapping of its fields).
        mode: ``"auto"`` applies as soon as a version passed; ``"manual"`` waits
            for ``apply_pending()``.
        staging: where fetched bytes wait for CUDA models: ``"auto"``/``"pinned"``
            (pinned host memory) or ``"device"`` (device memory).
        staging_keep_bytes: host staging memory of a CPU model kept between
            versions (up to this many bytes), so the next version's fetch lands
            in memory already faulted in; 0 keeps none (default: the
            ``staging_keep_bytes`` setting, 64 MiB).
        on_applied: called as ``on_applied(version, ApplyReport)``.
        on_rejected: called as ``on_rejected(version, reasons)``.

    Build the agent after the model is on its device (``module.to()`` replaces
    buffers). Callbacks run on the agent's thread (``apply_pending()``'s caller
    in manual mode) before ``wait_for`` returns; an exception in one is logged.
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        model_name: str,
        *,
        settings: HotswapSettings | None = None,
        connection: RedisClient | None = None,
        policy: Policy | Mapping[str, Any] | None = None,
        mode: Mode = "auto",
        staging: Staging = "auto",
        staging_keep_bytes: int | None = None,
        on_applied: Callable[[int, ApplyReport], None] | None = None,
        on_rejected: Callable[[int, dict[str, list[str]]], None] | None = None,
    ) -> None:
        self.model_name = keys.check_name(model_name)
        if mode not in ("auto", "manual"):
            raise ConfigError(f"agent mode {mode!r} is unknown: use 'auto' or 'manual'")
        if staging not in ("auto", "pinned", "device"):
            raise ConfigError(f"staging {staging!r} is unknown: use 'auto', 'pinned' or 'device'")
        self.settings = settings or HotswapSettings()
        self.policy = validate.as_policy(policy)
        self.mode, self.staging = mode, staging
        self.on_applied, self.on_rejected = on_applied, on_rejected
        s = self.settings
        self._owns_client = connection is None
        self._stop = threading.Event()
        client = connection if connection is not None else connect(s)
        # Retries of the agent's own reads give up between attempts once
        # stop() is called, so stop() never waits out a retry budget.
        retrying = retry_from_settings(s).copy(
            stop=tenacity.stop_after_attempt(s.retry_attempts)
            | tenacity.stop_when_event_set(self._stop),
            sleep=self._stop.wait,
        )
        self.store = Store.from_settings(client, self.model_name, s, retrying)
        self.live = LiveModel(model)
        if staging_keep_bytes is None:
            staging_keep_bytes = s.staging_keep_bytes
        self._memory = HostMemory(staging_keep_bytes)
        self.agent_id = agent_id()
        # Status writes are tried once: the reporter's thread tries again later,
        # and stop()'s last write must not wait out a retry budget.
        once = Store(client, self.model_name, namespace=s.namespace, retrying=operation_retry(1))
        self.reporter = Reporter(once, self.agent_id, s.heartbeat_ttl, log)
        self._gate = Gate()
        self._cond = threading.Condition()
        self._lookout = Lookout(
            self.store,
            s,
            running=lambda: (self._applied, self._lineage),
            consider=self._consider,
            refuse=self._refuse_manifest,
            gone=self._head_gone,
            settle=self._settle,
        )
        self.delivery = Delivery(
            self.store,
            self.reporter,
            s.poll_interval,
            check=self._lookout.check,
            wanted=self._lookout.wanted,
            serving=self._serving,
            connected=self._connected,
            stop=self._stop,
        )
        self._thread: threading.Thread | None = None
        # Guarded by _cond: what runs, what was refused, what waits (manual mode).
        self._digests: dict[str, str] = {}
        self._norms = RunningNorms(self.policy)
        self._generation = 0
        self._applying = False
        self._applied: int | None = None
        self._lineage: str | None = None
        self._rejections: dict[int, tuple[str | None, ValidationError]] = {}
        self._last_rejection: ValidationError | None = None
        self._pending: Staged | None = None

    # -- public API -------------------------------------------------------------

    @property
    def applied_version(self) -> int | None:
        """The version the model runs (None until the first version is applied)."""
        return self._applied

    @property
    def head_version(self) -> int | None:
        """The head this agent last saw in Redis."""
        return self._lookout.head

    @property
    def pending_version(self) -> int | None:
        """The fetched, valid version waiting for ``apply_pending()`` (manual mode)."""
        pending = self._pending
        return None if pending is None else pending.plan.manifest.version

    @property
    def state(self) -> str:
        return self.reporter.status.state

    @property
    def last_rejection(self) -> ValidationError | None:
        return self._last_rejection

    def start(self) -> Agent:
        """Start the background thread (returns at once; idempotent)."""
        if self._stop.is_set():
            raise ConfigError(f"agent of model {self.model_name!r} was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"hotswap-agent-{self.model_name}", daemon=True
            )
            self._thread.start()
            self.reporter.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread and report the agent stopped (its heartbeat then expires).

        Bounded when Redis is down or frozen: the thread abandons its retries
        (and, with a client of its own, a read stuck on a frozen server), and
        the final status write is tried once for at most a second.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            deadline = time.monotonic() + timeout
            thread.join(min(timeout, STOP_GRACE_SECONDS))
            if thread.is_alive() and self._owns_client:
                # Stuck in a read from a frozen server (up to socket_timeout):
                # closing the client's sockets ends the read at once.
                with contextlib.suppress(Exception):
                    self.store.client.close()
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.release()
        self._memory.clear()
        self.reporter.update(state="stopped")
        self.reporter.close(min(timeout, FINAL_WRITE_SECONDS))
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.store.client.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold the reader side around a forward pass: no update is applied inside.

        For threads (re-entrant within a thread). In asyncio code use
        ``reading_async()``.

        Raises:
            ConfigError: entered by a second asyncio task on an event loop while
                another task holds it across an ``await``.

        Example:
            >>> with agent.reading(), torch.inference_mode():  # doctest: +SKIP
            ...     logits = model(batch)
        """
        return self._gate.reading()

    def reading_async(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the reader side from asyncio code (awaits; never blocks the loop).

        Re-entrant within a task. Each task (each request handler) holds its
        own read, so a handler may ``await`` inside it while others read too.

        Example:
            >>> async with agent.reading_async():  # doctest: +SKIP
            ...     logits = await run_model(batch)
        """
        return self._gate.reading_async()

    def apply_pending(self) -> int | None:
        """Apply the newest fetched and validated version (manual mode); its number or None."""
        if self._gate.held_in_thread():
            raise ConfigError(
                f"agent of model {self.model_name!r}: apply_pending() was called inside "
                "reading() (or while another task on this event loop holds it); call it "
                "between forward passes"
            )
        with self._cond:
            staged, self._pending = self._pending, None
            if staged is None:
                return None
            self._applying = True
        try:
            self._apply(staged)
        finally:
            staged.release()
            with self._cond:
                self._applying = False
        return staged.plan.manifest.version

    def wait_for(self, version: int, timeout: float = 10.0) -> bool:
        """True once ``version`` (or a newer one) runs, False after ``timeout`` seconds.

        Raises ValidationError if this agent rejected ``version``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                refused = self._rejections.get(version)
                if refused is not None:
                    error = refused[1]
                    raise ValidationError(str(error), error.reasons) from error.__cause__
                if self._applied is not None and self._applied >= version:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    # -- the background thread --------------------------------------------------

    def _run(self) -> None:
        digests = self.live.digests()
        with self._cond:
            self._digests = digests
        self.delivery.run()

    def _refuse_manifest(self, version: int, e: IntegrityError) -> None:
        refused = self._rejections.get(version)
        if refused is None or str(refused[1].__cause__) != str(e):
            self._reject(version, None, {"<manifest>": [str(e)]}, e)

    def _head_gone(self) -> None:
        if self._applied is not None:
            gone = (
                f"model {self.model_name!r} has no head in Redis (Redis lost its data "
                f"or the model was deleted); still serving v{self._applied}"
            )
            self.reporter.update(last_error=gone)
            self.delivery.log_once("head-gone", logging.WARNING, gone)

    def _settle(self) -> None:
        self.reporter.update(state="pending" if self._pending else "idle")

    def _consider(self, m: Manifest, carried: bytes | None = None) -> None:
        with self._cond:
            same_line = m.lineage == self._lineage
            if same_line and self._applied is not None and m.version <= self._applied:
                return
            refused = self._rejections.get(m.version)
            if refused is not None and refused[0] == m.lineage:
                return
            pending = self._pending.plan.manifest if self._pending else None
            if pending and (pending.version, pending.lineage) == (m.version, m.lineage):
                return
        if self._lineage is not None and not same_line:
            self.delivery.log_once(
                f"lineage:{m.lineage}",
                logging.WARNING,
                f"model {self.model_name!r}: head v{m.version} is of a new lineage {m.lineage} "
                f"(Redis lost its data or was reset); comparing tensors by digest",
            )
        while not self._stage_and_decide(m, carried):
            pass  # a manual apply_pending() ran meanwhile: plan again against what runs now

    def _stage_and_decide(self, m: Manifest, carried: bytes | None) -> bool:
        where = f"model {self.model_name!r} v{m.version}"
        with self._cond:
            digests, generation = dict(self._digests), self._generation
            norms = self._norms.known(digests)
        # The reporter's thread writes this while the fetch runs.
        self.reporter.update(state="fetching")
        staged, reasons = prepare(
            self.store.blobs,
            m,
            self.live,
            digests,
            self.policy,
            mode=self.staging,
            where=where,
            between=self._between_tensors,
            memory=self._memory,
            old_norms=norms,
        )
        self.reporter.update(
            fetch_seconds=staged.seconds,
            validate_seconds=staged.validate_seconds,
            bytes_fetched=self.reporter.status.bytes_fetched + staged.bytes_fetched,
        )
        if carried is not None:
            self._lookout.confirm(m, carried, staged)  # raises Unconfirmed unless Redis agrees
        with self._cond:
            self._norms.learn(m, digests)
        if reasons:
            staged.release()
            self._reject(m.version, m.lineage, reasons, None, staged.bytes_fetched)
            return True
        if self.mode == "auto":
            try:
                if self._stop.is_set():
                    raise Stopped  # stop() may have given up waiting: change nothing after it
                self._apply(staged)
            finally:
                staged.release()
            return True
        with self._cond:
            if self._applying or self._generation != generation:
                stale: Staged | None = staged
            else:
                stale, self._pending = self._pending, staged
                # With the pending version: whoever sees one sees the other.
                self.reporter.update(state="pending")
        if stale is not None:
            stale.release()
        if stale is staged:
            return False
        log.info("model %r: v%d valid; apply_pending() applies it", self.model_name, m.version)
        return True

    def _between_tensors(self) -> None:
        if self._stop.is_set():
            raise Stopped

    def _apply(self, staged: Staged) -> None:
        m = staged.plan.manifest
        self.reporter.update(state="applying")
        copies = pairs(staged, self.live)
        with self._gate.writing():
            locked = time.perf_counter()
            apply(copies)
            with self._cond:
                # Still under the writer lock: a reader never sees new weights
                # with the old version number.
                for name, entry in staged.plan.changed.items():
                    self._digests[name] = entry.digest
                self._norms.applied(staged.plan.changed, staged.norms)
                self._generation += 1
                if m.lineage != self._lineage:
                    self._rejections = {
                        v: r for v, r in self._rejections.items() if r[0] in (m.lineage, None)
                    }
                self._applied, self._lineage = m.version, m.lineage
        report = ApplyReport(
            m.version,
            m.lineage,
            len(staged.plan.changed),
            staged.bytes_fetched,
            staged.seconds,
            staged.validate_seconds,
            time.perf_counter() - locked,
            staged.started,
        )
        # The reporter's thread writes the record: neither this thread nor
        # apply_pending()'s caller waits for Redis.
        self.reporter.applied(report, log)
        self.delivery.note("applied")
        _callback(self.on_applied, m.version, report)
        with self._cond:
            # Waiters wake after the callback: it has run when wait_for returns.
            self._cond.notify_all()

    def _reject(
        self,
        version: int,
        lineage: str | None,
        reasons: dict[str, list[str]],
        cause: Exception | None,
        nbytes: int = 0,
    ) -> None:
        error = validate.rejection(self.model_name, version, reasons)
        error.__cause__ = cause
        # The record is written before waiters wake, so they can read it at once.
        self.reporter.rejected(version, error, nbytes, bool(self._pending), log)
        self.delivery.note(f"rejected:{version}")
        _callback(self.on_rejected, version, error.reasons)
        with self._cond:
            self._rejections[version] = (lineage, error)
            self._last_rejection = error
            self._cond.notify_all()

    def _connected(self) -> None:
        self.reporter.update(state="pending" if self._pending else "idle", last_error=None)

    def _serving(self) -> str:
        return "nothing yet" if self._applied is None else f"v{self._applied}"


def _callback(fn: Callable[..., None] | None, *args: Any) -> None:
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("agent callback %r raised; the agent carries on", fn)


__all__ = ["Agent", "ApplyReport", "Policy"]
