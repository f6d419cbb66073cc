"""The agent: keeps a serving process's model at the head version, safely.

``Agent`` is the public face; the parts behind it read top to bottom:
``delivery.Delivery`` is the background loop (subscribe, poll head, reconnect
with backoff), ``pipeline.Pipeline`` takes each notice or poll to its end
(which manifest, ``lookout``; fetch and validate, ``staging``; confirm a
manifest a notice carried; then apply, refuse or leave pending), and
``reporter.Reporter`` writes the status record and heartbeat from its own
thread, never in front of a fetch. New weights are copied in place under the
writer side of a readers-writer lock (``gate``), so a forward pass inside
``reading()`` sees one whole version. Redis going away delays updates and
never stops the thread or the serving process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import tenacity
import torch

from hotswap import group as groups
from hotswap import keys, metrics, priority, validate
from hotswap.callbacks import OnApplied, OnRejected
from hotswap.connection import RedisClient, connect, operation_retry, retry_from_settings
from hotswap.delivery import Delivery
from hotswap.errors import ConfigError
from hotswap.gate import Gate
from hotswap.hostmem import HostMemory
from hotswap.intake import Intake
from hotswap.names import NameMap
from hotswap.pipeline import Mode, Pipeline
from hotswap.postapply import Probe
from hotswap.priority import Foreground
from hotswap.replicas import ReplicaReads
from hotswap.reporter import ApplyReport, Health, Reporter, agent_id
from hotswap.settings import HotswapSettings
from hotswap.settings import load as load_settings
from hotswap.sharedblobs import share
from hotswap.slices import Chooser, ShardSpec, Slicer
from hotswap.staging import LiveModel, Staging
from hotswap.standing import Standing
from hotswap.store import Store
from hotswap.transform import Transform
from hotswap.validate import Policy

log = logging.getLogger("hotswap.agent")
# Longest ``stop()`` waits for the final status write (tried once).
FINAL_WRITE_SECONDS = 1.0
# How long ``stop()`` lets the thread finish what it does before closing its sockets.
STOP_GRACE_SECONDS = 1.0

StoreFactory = Callable[[RedisClient, str, HotswapSettings, tenacity.Retrying], Store]
"""Builds a ``Store`` from (client, model name, settings, retry policy); ``Store.from_settings``."""


class Agent(Standing):
    """Keeps ``model`` at the head version of ``model_name``, in place and all-or-nothing.

    Build the agent after the model is on its device (``module.to()`` replaces
    buffers). Callbacks run on the agent's thread (``apply_pending()``'s caller
    in manual mode) before ``wait_for`` returns; an exception in one is logged.

    Args:
        model: the live module (or a mapping of name to tensor) to update in place.
        model_name: the model's name in Redis.
        settings: connection and timing settings (default: ``HOTSWAP_*`` from the
            environment and ``.env``).
        connection: a Redis client to use instead of one built from ``settings``.
        policy: the validation ``Policy`` (or a mapping of its fields).
        mode: ``"auto"`` applies as soon as a version passed; ``"manual"`` waits
            for ``apply_pending()``.
        staging: where fetched bytes wait for CUDA models: ``"auto"``/``"pinned"``
            (pinned host memory) or ``"device"`` (device memory).
        staging_keep_bytes: host staging memory of a CPU model kept between
            versions (up to this many bytes), so the next version's fetch lands
            in memory already faulted in; 0 keeps none (default: the
            ``staging_keep_bytes`` setting).
        on_applied: called as ``on_applied(version, ApplyReport)``.
        on_rejected: called as ``on_rejected(version, reasons)``.
        store_factory: builds the agent's stores from (client, model name,
            settings, retry policy); default ``Store.from_settings``. Tests pass
            a ``Store`` subclass's builder to watch or fail Redis calls.
        clock: a monotonic clock in seconds for the poll timer and the
            heartbeat schedule (default ``time.monotonic``).
        names: a ``NameMap`` from the published names to the model's
            (``strip_prefix="bert."``, ``exclude=["*.position_ids"]``, ``rename``).
        transform: a ``Transform`` for published tensors the model holds
            fused or sliced (vLLM's ``load_weights`` pattern).
        probes: post-apply checks ``(model) -> None | str`` (``hotswap.postapply``):
            run on ``model`` after each copy, before readers resume; a reason
            (or a raise) puts the previous bytes back at once and refuses the
            version for good.
        name: a name this process gives its agent (default: the
            ``agent_name`` setting): the agent's id is then host-name, the same
            across restarts, so a rollout's canary stays one. Without a name (or
            ``HOTSWAP_AGENT_ID``) the id is new at each start.
        health: called every ``health_interval`` seconds on the status thread,
            returns numbers (error rate, latency, any scalar) by name; they go
            into the status record, where ``hotswap rollout`` judges canaries.
        shards: the slice of each published tensor a live tensor holds (tensor
            parallelism): ``{glob of live names: ShardSpec(rank, world_size, dim)}``
            or a callable ``(name, shape) -> Part | ShardSpec | None``
            (``hotswap.slices``); only the chunks covering a slice are fetched.
        tensors: globs of the live names this agent takes (expert parallelism);
            the others are left out of every version (default: all).

    Raises:
        ConfigError: a bad argument, a bad ``HOTSWAP_*`` variable (when
            ``settings`` is not given), or a live tensor that cannot be updated.

    Example:
        >>> agent = Agent(model, "resnet", policy={"norm_ratio": (0.5, 2.0)})  # doctest: +SKIP
        >>> with agent:  # doctest: +SKIP
        ...     while serving:
        ...         with agent.reading():
        ...             logits = model(next_batch())
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
        on_applied: OnApplied | None = None,
        on_rejected: OnRejected | None = None,
        store_factory: StoreFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        names: NameMap | None = None,
        transform: Transform | None = None,
        probes: Sequence[Probe] = (),
        name: str | None = None,
        health: Health | None = None,
        shards: Mapping[str, ShardSpec] | Chooser | None = None,
        tensors: Sequence[str] | None = None,
    ) -> None:
        self.model_name = keys.check_name(model_name)
        if mode not in ("auto", "manual"):
            raise ConfigError(f"agent mode {mode!r} is unknown: use 'auto' or 'manual'")
        if staging not in ("auto", "pinned", "device"):
            raise ConfigError(f"staging {staging!r} is unknown: use 'auto', 'pinned' or 'device'")
        self.settings = settings if settings is not None else load_settings()
        self.policy = validate.as_policy(policy)
        self.mode, self.staging = mode, staging
        s = self.settings
        build = store_factory or Store.from_settings
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
        self.store = build(client, self.model_name, s, retrying)
        # HOTSWAP_READ_FROM_REPLICAS: blob chunks from replicas, metadata from primaries.
        self.store.blobs.replicas = ReplicaReads.of(client, s)
        # HOTSWAP_HOST_CACHE_DIR: the agents of one host fetch each blob from Redis once.
        self.store.blobs = share(self.store.blobs, s, self._stop)
        self.live = LiveModel(model)
        if staging_keep_bytes is None:
            staging_keep_bytes = s.staging_keep_bytes
        self._memory = HostMemory(staging_keep_bytes)
        # A fixed id (HOTSWAP_AGENT_ID) names the keys a per-agent ACL user may write.
        self.agent_id = s.agent_id or agent_id(name or s.agent_name)
        # Status writes are tried once: the reporter's thread tries again later,
        # and stop()'s last write must not wait out a retry budget.
        once = build(client, self.model_name, s, operation_retry(1))
        self.reporter = Reporter(
            once,
            self.agent_id,
            s.heartbeat_ttl,
            log,
            clock=clock,
            track=s.track,
            health=health,
            health_interval=s.health_interval,
        )
        self._gate = Gate()
        # The agent's thread runs below the serving threads (HOTSWAP_AGENT_NICE);
        # what holds the writer lock runs on this thread, at the starter's priority.
        self._foreground = Foreground(f"hotswap-writer-{self.model_name}")
        self._pipeline = Pipeline(
            self.store,
            s,
            self.live,
            self.policy,
            mode=mode,
            staging=staging,
            memory=self._memory,
            reporter=self.reporter,
            gate=self._gate,
            stop=self._stop,
            on_applied=on_applied,
            on_rejected=on_rejected,
            intake=Intake(names, transform, Slicer(shards, tensors)),
            probes=probes,
            model=model,
            revert_bytes=s.revert_bytes,
            foreground=self._foreground,
        )
        # The loop hands each notice or poll to the pipeline; every failure goes
        # to one handler, which reports the outage and logs it once.
        self.delivery = Delivery(
            self.store,
            s.poll_interval,
            handler=self._pipeline,
            exception_handler=self._pipeline.lost,
            stop=self._stop,
            clock=clock,
        )
        self._thread: threading.Thread | None = None
        # Prometheus reads head, applied version and state from here at each scrape.
        metrics.track(self)

    # -- public API -------------------------------------------------------------

    def start(self) -> Agent:
        """Start the background thread and the status writer (returns at once; idempotent).

        Returns:
            The agent, so that ``agent = Agent(...).start()`` reads in one line.

        Raises:
            ConfigError: the agent was stopped; build a new one.

        Example:
            >>> agent = Agent(model, "resnet").start()  # doctest: +SKIP
        """
        if self._stop.is_set():
            raise ConfigError(f"agent of model {self.model_name!r} was stopped; create a new one")
        if self._thread is None:
            self._foreground.start()
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
        the final status write is tried once for at most ``FINAL_WRITE_SECONDS``.
        Idempotent; the model keeps the version it runs.

        Args:
            timeout: longest wait in seconds for the thread to end.

        Example:
            >>> agent.stop()  # doctest: +SKIP
        """
        if self._stop.is_set():
            return
        self.delivery.stop()
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
        self._pipeline.probations.cancel()
        for pending in self._pipeline.state.take_pending():
            pending.release()
        self._memory.clear()
        self._foreground.close()
        self.reporter.update(state="stopped")
        self.reporter.close(min(timeout, FINAL_WRITE_SECONDS))
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.store.client.close()
        if self.store.blobs.replicas is not None:
            self.store.blobs.replicas.close()

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

    def revert(self, group: Any = None) -> int | None:
        """Put back the version that ran before the last one applied, from host memory.

        One ``copy_`` per replaced tensor (or a scatter of a sparse delta's
        elements) under the writer lock, from the bytes the apply kept
        (``HOTSWAP_REVERT_BYTES``): no Redis, so it works while Redis is down.
        The reverted version counts as refused by this agent from then on (it
        is not applied again when the agent converges on head); a newer
        version is. Call it between forward passes, never inside ``reading()``.

        Args:
            group: a ``torch.distributed`` process group whose every rank calls
                this at the same step: all revert the same version, or none does.

        Returns:
            The version running again (None: the model's own weights).

        Raises:
            HotswapError: nothing to revert (no apply since start or the last
                revert, or the last version's bytes exceeded the budget); with a
                group, on any rank (``GroupError``: a rank died or timed out).
            ConfigError: called inside ``reading()``.

        Example:
            >>> agent.revert()  # the new weights answer badly  # doctest: +SKIP
            6
        """
        if self._gate.held_in_thread():
            raise ConfigError(
                f"agent of model {self.model_name!r}: revert() was called inside reading(); "
                "call it between forward passes"
            )
        if group is not None:
            return groups.revert(self._pipeline, group)
        return self._pipeline.revert()

    def apply_pending(self, group: Any = None) -> int | None:
        """Apply the newest fetched and validated version now (manual mode).

        The copy runs on the caller's thread under the writer lock, so call it
        between forward passes, never inside ``reading()``.

        Args:
            group: a ``torch.distributed`` process group (tensor-parallel ranks)
                whose every rank calls this at the same step: the newest version
                every rank holds and none refused is applied on all, or on none
                (``hotswap.group``); a rank's refusal refuses it on all.

        Returns:
            The version applied (with a group: the same on every rank), or None.

        Raises:
            ConfigError: called inside ``reading()`` (or while another task on
                this event loop holds it).
            GroupError: a collective of the group failed (a rank died: the
                group's timeout); this rank applied nothing.

        Example:
            >>> agent = Agent(model, "resnet", mode="manual").start()  # doctest: +SKIP
            >>> agent.apply_pending()  # between two batches  # doctest: +SKIP
            3
        """
        if self._gate.held_in_thread():
            raise ConfigError(
                f"agent of model {self.model_name!r}: apply_pending() was called inside "
                "reading() (or while another task on this event loop holds it); call it "
                "between forward passes"
            )
        if group is not None:
            return groups.apply_pending(self._pipeline, group)
        return groups.apply_newest(self._pipeline)

    def wait_for(self, version: int, timeout: float = 10.0) -> bool:
        """Wait until ``version`` (or a newer one) runs, its ``on_applied`` callback run.

        Args:
            version: the version to wait for.
            timeout: longest wait in seconds.

        Returns:
            True once it runs, False if it did not within ``timeout``.

        Raises:
            ValidationError: this agent refused ``version`` (its ``reasons`` say why).

        Example:
            >>> v = publisher.publish(model.state_dict())  # doctest: +SKIP
            >>> agent.wait_for(v, timeout=30)  # doctest: +SKIP
            True
        """
        return self._pipeline.state.wait_for(version, timeout)

    # -- the background thread --------------------------------------------------

    def _run(self) -> None:
        # Everything this thread starts from now on inherits its lower priority.
        priority.lower(self.settings.agent_nice, self.settings.agent_threads)
        self._pipeline.start()
        self.delivery.run()


__all__ = ["Agent", "ApplyReport", "Policy", "StoreFactory"]
