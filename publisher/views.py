"""What ``hotswap status`` shows, as data: the head and one row per agent record.

The CLI prints these rows (``render.status_table``) or dumps them as
``--json``; the demo watches its server's agent through them. Everything
here is pure but ``status_view``, which reads the store. Imports no torch:
``hotswap status`` must stay quick to start.
"""

from __future__ import annotations

import time
from typing import Any

from hotswap import status as st
from hotswap.errors import HotswapError
from hotswap.status import AgentStatus
from hotswap.store import Store


def rejection_reason(s: AgentStatus) -> str | None:
    """The first rejected tensor and why (with how many more), or the error that refused it."""
    if not s.rejection:
        return s.last_error if s.rejected_version is not None else None
    name, why = next(iter(sorted(s.rejection.items())))
    more = f" (+{len(s.rejection) - 1} more tensors)" if len(s.rejection) > 1 else ""
    return f"{name}: {', '.join(why)}{more}"


def agent_row(
    s: AgentStatus, alive: bool, head: int | None, lineage: str | None, now: float
) -> dict[str, Any]:
    """One agent's row: its record, its lag behind ``head`` and its heartbeat's age."""
    same_history = lineage is None or s.lineage is None or s.lineage == lineage
    lag = head - s.version if head is not None and s.version is not None and same_history else None
    return {
        "agent_id": s.agent_id,
        "host": s.host,
        "pid": s.pid,
        "state": s.state,
        "version": s.version,
        "lag": lag,
        "same_lineage": same_history,
        "alive": alive,
        "heartbeat_age": round(now - s.updated, 3) if s.updated else None,
        "last_error": s.last_error,
        "rejected_version": s.rejected_version,
        "last_rejection": rejection_reason(s),
        "rejection": s.rejection,
        "applied_count": s.applied_count,
        "rejected_count": s.rejected_count,
        "bytes_fetched": s.bytes_fetched,
    }


def decode_record(agent_id: str, raw: bytes) -> AgentStatus:
    """An agent's record; one that does not decode is shown as "unreadable", not an error.

    Any agent's ACL user can write its record, so one bad record must not
    hide the others.
    """
    try:
        return st.decode(raw)
    except HotswapError as e:
        return AgentStatus(agent_id, "?", 0, state="unreadable", last_error=str(e))


def agent_statuses(store: Store) -> list[tuple[AgentStatus, bool]]:
    """Every agent's record, by agent id, and whether its heartbeat is alive."""
    return [(decode_record(agent_id, raw), alive) for agent_id, raw, alive in store.agent_records()]


def status_view(store: Store, now: float | None = None) -> dict[str, Any]:
    """The model's head and lineage, and a row per agent that reported (JSON-able).

    Args:
        store: the model's store.
        now: the time heartbeat ages are counted to (default: the clock).

    Returns:
        ``{"model", "head", "lineage", "agents": [row, ...]}``, as
        ``hotswap status --json`` prints it.

    Raises:
        StoreUnavailable: Redis could not be reached.
        HotswapError: head's manifest could not be read.
    """
    head = store.head()
    lineage = store.manifest(head).lineage if head is not None else None
    now = time.time() if now is None else now
    agents = [agent_row(s, alive, head, lineage, now) for s, alive in agent_statuses(store)]
    return {"model": store.model, "head": head, "lineage": lineage, "agents": agents}
