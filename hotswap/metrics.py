"""Prometheus metrics of the agents in this process, when prometheus-client is installed.

Every metric is documented in docs/metrics.md. Two kinds:

- **Events** (rejections, bytes fetched, apply durations) are counted when
  they happen, labelled by model: several agents of one model in a process
  add up.
- **Where each agent stands** (head, applied version, lag, state; its track
  and health numbers) is read from the agents themselves at each scrape,
  labelled by model and agent id, so the gauges always agree with each other
  and with ``Agent.head_version``/``applied_version``/``state`` and its status
  record, and cost nothing between scrapes. An agent is reported from its construction until it is
  garbage-collected (its state says ``stopped`` once stopped).

Everything is created once per process, on first use, in the default registry
(Prometheus refuses a second registration of a name, and several agents share
a process). Without prometheus-client every call here does nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from hotswap.status import STATES, AgentStatus

_lock = threading.Lock()
# {"metrics": _Metrics | None} once looked up; empty before.
_made: dict[str, _Metrics | None] = {}


class Reporting(Protocol):
    """Whatever holds an agent's status record (``hotswap.reporter.Reporter``)."""

    @property
    def status(self) -> AgentStatus: ...


class Tracked(Protocol):
    """What the gauges read from an agent (``hotswap.Agent`` has it all)."""

    model_name: str
    agent_id: str

    @property
    def reporter(self) -> Reporting: ...

    @property
    def head_version(self) -> int | None: ...

    @property
    def applied_version(self) -> int | None: ...

    @property
    def state(self) -> str: ...


class _Standing:
    """A collector: the gauges of every tracked agent, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak: tracking an agent must not keep it, its model or its sockets alive.
        self._agents: weakref.WeakSet[Tracked] = weakref.WeakSet()

    def track(self, agent: Tracked) -> None:
        with self._lock:
            self._agents.add(agent)

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        with self._lock:
            agents = list(self._agents)
        families = self._families()
        head, applied, lag, state, info, health, pinned = families
        for agent in agents:
            labels = [agent.model_name, agent.agent_id]
            record = agent.reporter.status
            info.add_metric([*labels, record.track or "stable"], 1.0)
            for name, value in sorted((record.health or {}).items()):
                health.add_metric([*labels, name], value)
            if record.pinned is not None:
                pinned.add_metric(labels, record.pinned)
            # One read of each property, so lag is head minus the applied shown.
            h, v, now = agent.head_version, agent.applied_version, agent.state
            if h is not None:
                head.add_metric(labels, h)
                lag.add_metric(labels, h - (v or 0))
            if v is not None:
                applied.add_metric(labels, v)
            names = STATES if now in STATES else (*STATES, now)
            for name in names:
                state.add_metric([*labels, name], 1.0 if name == now else 0.0)
        yield from families

    @staticmethod
    def _families() -> tuple[Any, Any, Any, Any, Any, Any, Any]:
        from prometheus_client.core import GaugeMetricFamily

        per_agent = ["model", "agent"]
        return (
            GaugeMetricFamily(
                "hotswap_head_version",
                "Head version the agent last read in Redis.",
                labels=per_agent,
            ),
            GaugeMetricFamily(
                "hotswap_applied_version", "Version the agent's model runs.", labels=per_agent
            ),
            GaugeMetricFamily(
                "hotswap_lag_versions",
                "Versions between head and what the model runs (head when none runs yet).",
                labels=per_agent,
            ),
            GaugeMetricFamily(
                "hotswap_agent_state",
                "1 for the agent's current state, 0 for the others.",
                labels=[*per_agent, "state"],
            ),
            GaugeMetricFamily(
                "hotswap_agent_info",
                "Always 1: the agent and the track it follows (HOTSWAP_TRACK).",
                labels=[*per_agent, "track"],
            ),
            GaugeMetricFamily(
                "hotswap_health",
                "The numbers the agent's health callback returned last (Agent(health=...)).",
                labels=[*per_agent, "name"],
            ),
            GaugeMetricFamily(
                "hotswap_pinned_version",
                "The version a rollout pinned the agent to (absent: it follows head).",
                labels=per_agent,
            ),
        )


@dataclass(frozen=True)
class _Metrics:
    rejections: Any
    reverts: Any
    probe_failures: Any
    apply_seconds: Any
    bytes_fetched: Any
    rollouts: Any
    rollout_step: Any
    standing: _Standing


def _get() -> _Metrics | None:
    with _lock:
        if "metrics" in _made:
            return _made["metrics"]
        _made["metrics"] = None
        try:
            import prometheus_client as prom
        except ImportError:
            return None
        standing = _Standing()
        prom.REGISTRY.register(standing)
        _made["metrics"] = _Metrics(
            rejections=prom.Counter("hotswap_rejections", "Versions the agent refused.", ["model"]),
            reverts=prom.Counter(
                "hotswap_reverts", "Versions the agent put back from host memory.", ["model"]
            ),
            probe_failures=prom.Counter(
                "hotswap_probe_failures",
                "Versions a post-apply probe or a probation failure refused.",
                ["model"],
            ),
            apply_seconds=prom.Histogram(
                "hotswap_apply_seconds",
                "Seconds the writer lock was held to apply a version.",
                ["model"],
                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ),
            bytes_fetched=prom.Counter(
                "hotswap_fetched_bytes", "Tensor bytes fetched from Redis.", ["model"]
            ),
            rollouts=prom.Counter(
                "hotswap_rollouts",
                "Rollouts this process drove to an end, by outcome (promoted, rolled_back, "
                "superseded, aborted).",
                ["model", "outcome"],
            ),
            rollout_step=prom.Gauge(
                "hotswap_rollout_step",
                "The step a rollout this process drives is at (1 = the canary; 0: none).",
                ["model"],
            ),
            standing=standing,
        )
        return _made["metrics"]


def track(agent: Tracked) -> None:
    """Report ``agent``'s head, applied version, lag, state, track and health numbers at
    every scrape."""
    m = _get()
    if m is not None:
        m.standing.track(agent)


def applied(model: str, version: int, apply_seconds: float, nbytes: int) -> None:
    """Count an applied version (its number is read from the agent at scrape time)."""
    m = _get()
    if m is not None:
        m.apply_seconds.labels(model=model).observe(apply_seconds)
        m.bytes_fetched.labels(model=model).inc(nbytes)


def rejected(model: str, nbytes: int) -> None:
    """Count a refused version and the bytes fetched for it."""
    m = _get()
    if m is not None:
        m.rejections.labels(model=model).inc()
        m.bytes_fetched.labels(model=model).inc(nbytes)


def reverted(model: str) -> None:
    """Count a revert (the version running again is read at scrape time)."""
    m = _get()
    if m is not None:
        m.reverts.labels(model=model).inc()


def probe_failed(model: str) -> None:
    """Count a version a probe or a probation refused (also counted as a rejection or a
    revert)."""
    m = _get()
    if m is not None:
        m.probe_failures.labels(model=model).inc()


def rollout_step(model: str, step: int) -> None:
    """The step the rollout of ``model`` driven here is at (0 once it ended)."""
    m = _get()
    if m is not None:
        m.rollout_step.labels(model=model).set(step)


def rollout_ended(model: str, outcome: str) -> None:
    """Count a rollout driven here that ended with ``outcome``."""
    m = _get()
    if m is not None:
        m.rollouts.labels(model=model, outcome=outcome).inc()
        m.rollout_step.labels(model=model).set(0)


def enabled() -> bool:
    """Whether metrics are being recorded (prometheus-client importable)."""
    return _get() is not None
