"""What agents' status records say about versions: which ones agents run, which they rejected.

``hotswap rollback``'s default target passes over every version an agent
rejected and prefers one that live agents run (``publisher.restore``). The
rejections of agents whose heartbeat expired still count until their records
are gone (a day, ``AGENT_RECORD_LINGER``): a rejection is evidence whoever
made it; what a dead agent ran is not what the fleet runs. Everything here is
pure but ``read``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hotswap import status as st
from hotswap.status import AgentStatus
from hotswap.store import Store
from publisher import views

# Agent ids a reason names before it counts the rest.
NAMED = 3


@dataclass(frozen=True)
class Fleet:
    """Agents by version: live ones whose record says they run it, any that rejected it."""

    running: dict[int, list[str]] = field(default_factory=dict)
    rejected: dict[int, list[str]] = field(default_factory=dict)


def of(
    records: Iterable[tuple[AgentStatus, bool]],
    lineage: str | None,
    stored: Mapping[int, str | None],
) -> Fleet:
    """The fleet as ``records`` (each with whether its agent is alive) describe it,
    within ``lineage`` (None: any).

    An agent of another lineage numbers other versions (Redis was emptied
    and published again): its record says nothing about these. A diverged
    agent (``views.diverged``, ``stored`` as there) runs content no stored
    version has: it runs no version here, though its rejections count.

    Example:
        >>> s = AgentStatus("a", "h", 1, version=5, rejected_versions=[7, 8])
        >>> of([(s, True)], None, {})
        Fleet(running={5: ['a']}, rejected={7: ['a'], 8: ['a']})
    """
    running: dict[int, list[str]] = {}
    rejected: dict[int, list[str]] = {}
    for s, alive in records:
        if s.state == "unreadable" or (lineage and s.lineage and s.lineage != lineage):
            continue
        for v in st.rejected(s):
            rejected.setdefault(v, []).append(s.agent_id)
        if alive and s.version is not None and not views.diverged(s, stored):
            running.setdefault(s.version, []).append(s.agent_id)
    return Fleet(running, rejected)


def read(store: Store, lineage: str | None) -> Fleet:
    """The fleet of ``store``'s model from every agent record in Redis (see ``of``)."""
    records = views.agent_statuses(store)
    stored = views.stored_digests(store, {s.version for s, _ in records if s.manifest_digest})
    return of(records, lineage, stored)


def agents(ids: list[str]) -> str:
    """``ids`` for a message: "agent a", "agents a, b", "5 agents (a, b, c, ...)".

    Example:
        >>> agents(["a"]), agents(["b", "a"]), agents(["a", "b", "c", "d"])
        ('agent a', 'agents a, b', '4 agents (a, b, c, ...)')
    """
    names = sorted(set(ids))
    if len(names) == 1:
        return f"agent {names[0]}"
    if len(names) <= NAMED:
        return "agents " + ", ".join(names)
    return f"{len(names)} agents ({', '.join(names[:NAMED])}, ...)"
