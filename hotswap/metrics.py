"""Prometheus metrics of the agents in this process, when prometheus-client is installed.

The metrics are created once per process, on first use, in the default
registry (Prometheus refuses a second registration of a name, and several
agents share a process); each agent labels its samples with its model. Without
prometheus-client every call here does nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_lock = threading.Lock()
# {"metrics": _Metrics | None} once looked up; empty before.
_made: dict[str, _Metrics | None] = {}


@dataclass(frozen=True)
class _Metrics:
    applied_version: Any
    rejections: Any
    apply_seconds: Any
    bytes_fetched: Any


def _get() -> _Metrics | None:
    with _lock:
        if "metrics" in _made:
            return _made["metrics"]
        _made["metrics"] = None
        try:
            import prometheus_client as prom
        except ImportError:
            return None
        _made["metrics"] = _Metrics(
            applied_version=prom.Gauge(
                "hotswap_applied_version", "Version the agent's model runs.", ["model"]
            ),
            rejections=prom.Counter("hotswap_rejections", "Versions the agent refused.", ["model"]),
            apply_seconds=prom.Histogram(
                "hotswap_apply_seconds",
                "Seconds the writer lock was held to apply a version.",
                ["model"],
                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ),
            bytes_fetched=prom.Counter(
                "hotswap_fetched_bytes", "Tensor bytes fetched from Redis.", ["model"]
            ),
        )
        return _made["metrics"]


def applied(model: str, version: int, apply_seconds: float, nbytes: int) -> None:
    m = _get()
    if m is not None:
        m.applied_version.labels(model=model).set(version)
        m.apply_seconds.labels(model=model).observe(apply_seconds)
        m.bytes_fetched.labels(model=model).inc(nbytes)


def rejected(model: str, nbytes: int) -> None:
    m = _get()
    if m is not None:
        m.rejections.labels(model=model).inc()
        m.bytes_fetched.labels(model=model).inc(nbytes)


def enabled() -> bool:
    """Whether metrics are being recorded (prometheus-client importable)."""
    return _get() is not None
