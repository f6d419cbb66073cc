"""Liveness and readiness of a serving process, judged from its agent (imports no Redis, no torch).

Two questions a load balancer asks, answered differently:

- **alive** (``/healthz``): the agent's thread runs. Redis being away is
  alive: the model keeps serving what it has, and restarting the process
  would not bring Redis back. Only a stopped agent is not alive.
- **ready** (``/readyz``): the process serves what it should, so traffic
  may come. It has looked at Redis at least once and runs head, or refused
  head (a NaN, a wrong shape) while it runs an earlier version: a bad
  publish must not take every replica out of service. Before its first look,
  while it catches up with a newer head, or when it runs no version at all
  and head was refused, it is not ready. With nothing published, the model's
  own weights are what it should serve: ready.

Once ready, a Redis outage keeps the process ready (it runs the head it saw
last); a new head makes it unready until that version is applied or refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hotswap.agent import Agent


@dataclass(frozen=True)
class Readiness:
    """What ``readiness(agent)`` found: the verdicts, why, and what they rest on."""

    ready: bool
    alive: bool
    reason: str
    state: str
    applied_version: int | None
    head_version: int | None
    rejected_version: int | None

    @property
    def lag(self) -> int | None:
        """Versions between what runs and head (None while either is unknown)."""
        if self.head_version is None or self.applied_version is None:
            return None
        return self.head_version - self.applied_version

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values, for a probe's body."""
        return {
            "ready": self.ready,
            "alive": self.alive,
            "reason": self.reason,
            "state": self.state,
            "version": self.applied_version,
            "head": self.head_version,
            "lag": self.lag,
            "rejected_version": self.rejected_version,
        }


def judge(
    state: str,
    applied: int | None,
    head: int | None,
    rejected: int | None = None,
    *,
    seen: bool = True,
) -> Readiness:
    """The verdicts for an agent in ``state`` that runs ``applied``, saw ``head`` (read
    it at all: ``seen``) and refused ``rejected`` last (the rules of this module's
    docstring).

    Example:
        >>> judge("idle", applied=3, head=3).ready
        True
        >>> judge("fetching", applied=3, head=4).reason
        'catching up: runs v3, head is v4'
        >>> judge("idle", applied=3, head=4, rejected=4).ready
        True
    """

    def verdict(ready: bool, reason: str) -> Readiness:
        return Readiness(ready, state != "stopped", reason, state, applied, head, rejected)

    runs = "the model's own weights" if applied is None else f"v{applied}"
    if state == "stopped":
        return verdict(False, "the agent has stopped")
    if state == "starting" or not seen:
        if state == "disconnected":
            return verdict(False, "Redis is unreachable and head was never read")
        return verdict(False, "the agent has not read head from Redis yet")
    if head is None:
        return verdict(True, "no version is published: serving the model's own weights")
    if applied == head:
        return verdict(True, f"runs head v{head}")
    if rejected == head:
        if applied is None:
            return verdict(False, f"refused head v{head} and runs no published version")
        return verdict(True, f"refused head v{head}: serving {runs}")
    return verdict(False, f"catching up: runs {runs}, head is v{head}")


def readiness(agent: Agent) -> Readiness:
    """Whether ``agent``'s process is alive and ready for traffic, and why.

    Reads the agent's properties only (no Redis call), so a probe may ask as
    often as it likes.

    Example:
        >>> check = readiness(agent)  # doctest: +SKIP
        >>> (200 if check.ready else 503), check.reason  # doctest: +SKIP
        (200, 'runs head v7')
    """
    record = agent.reporter.status
    # What the weights hold: set under the writer lock, never ahead of them.
    applied = agent.applied_version
    # Read before head: a head read after it is never older than the weights.
    seen = agent.head_seen
    return judge(record.state, applied, agent.head_version, record.rejected_version, seen=seen)


__all__ = ["Readiness", "judge", "readiness"]
