"""What ``hotswap status`` shows, as data: the head and one row per agent record.

The CLI prints these rows (``render.status_table``) or dumps them as
``--json``; the demo watches its server's agent through them. Everything
here is pure but ``status_view`` and the functions it calls, which read the
store. Imports no torch: ``hotswap status`` must stay quick to start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import blake3

from hotswap import status as st
from hotswap.errors import HotswapError, IntegrityError, NotFound
from hotswap.freshness import SignedHeads
from hotswap.status import AgentStatus
from hotswap.store import AgentRecord, AgentRecords, Store
from publisher import rolloutview


def rejection_reason(s: AgentStatus) -> str | None:
    """The first rejected tensor and why (with how many more), or the error that refused it."""
    if not s.rejection:
        return s.last_error if s.rejected_version is not None else None
    name, why = next(iter(sorted(s.rejection.items())))
    # The record keeps some of the tensors only; newer agents say how many there were.
    total = max(len(s.rejection), s.rejected_tensors or 0)
    more = f" (+{total - 1} more tensors)" if total > 1 else ""
    return f"{name}: {', '.join(why)}{more}"


def diverged(s: AgentStatus, stored: Mapping[int, str | None]) -> bool:
    """Whether the agent runs a manifest other than the one Redis stores as its version.

    ``stored`` maps versions to the BLAKE3 digest of their stored manifest (None
    when collected). Unknown either side (an agent older than the digest in its
    record, a collected version) is not divergence.
    """
    if s.version is None or s.manifest_digest is None:
        return False
    held = stored.get(s.version)
    return held is not None and held != s.manifest_digest


def agent_row(
    s: AgentStatus,
    alive: bool,
    head: int | None,
    lineage: str | None,
    now: float,
    *,
    stored: Mapping[int, str | None] | None = None,
) -> dict[str, Any]:
    """One agent's row: its record, its lag behind ``head`` and its heartbeat's age.

    An agent whose manifest digest is not that of its version's stored manifest
    (``stored``, see ``diverged``) runs content that no stored version has:
    its row says ``diverged`` and has no lag, never lag 0.
    """
    same_history = lineage is None or s.lineage is None or s.lineage == lineage
    apart = same_history and diverged(s, stored or {})
    lag = (
        head - s.version
        if head is not None and s.version is not None and same_history and not apart
        else None
    )
    return {
        "agent_id": s.agent_id,
        "host": s.host,
        "pid": s.pid,
        "state": s.state,
        "version": s.version,
        "manifest_digest": s.manifest_digest,
        "lag": lag,
        "same_lineage": same_history,
        "diverged": apart,
        "alive": alive,
        "heartbeat_age": round(now - s.updated, 3) if s.updated else None,
        "last_error": s.last_error,
        "rejected_version": s.rejected_version,
        "last_rejection": rejection_reason(s),
        "rejection": s.rejection,
        "rejected_tensors": s.rejected_tensors,
        "rejected_versions": st.rejected(s),
        "applied_count": s.applied_count,
        "rejected_count": s.rejected_count,
        "bytes_fetched": s.bytes_fetched,
        # Bytes fetched for the version applied last (None: an older agent).
        "last_fetched": s.last_fetched,
        # Delta encodings the agent decodes (None: an agent older than deltas).
        "encodings": s.encodings,
        # What it can apply, as the table's "reads" column: full blobs, then those.
        "reads": ["full", *(s.encodings or [])],
        # Fleet safety (None/0 from agents older than these fields): the track it
        # follows, its health numbers and their age, what probes refused, and the
        # version a rollout pinned it to.
        "track": s.track,
        "health": s.health,
        "health_age": round(now - s.health_at, 3) if s.health_at else None,
        "probe_failures": s.probe_failures,
        "last_probe": s.last_probe,
        "pinned": s.pinned,
        # The process group it applies with (None: none), its rank and the group's size.
        "group": s.group,
        "rank": s.rank,
        "world": s.world,
    }


def group_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per process group (``Agent.apply_pending(group=...)``), from the agents' rows.

    A group's version is shown only when every rank reported, is alive, and runs the
    same manifest; otherwise ``state`` says why: ``missing rank R`` (its record is
    gone), ``dead rank R`` (its heartbeat expired or it stopped), or ``split`` (ranks
    run different versions: the group protocol never does this).

    Example:
        >>> row = {"group": "g", "world": 2, "alive": True, "version": 3, "manifest_digest": "d"}
        >>> [g["state"] for g in group_rows([{**row, "rank": 0}, {**row, "rank": 1}])]
        ['agreed']
        >>> group_rows([{**row, "rank": 0}])[0]["state"]
        'missing rank 1'
    """
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("group") is not None:
            by_group.setdefault(row["group"], []).append(row)
    found = []
    for name, members in sorted(by_group.items()):
        world = max(int(m.get("world") or 0) for m in members)
        ranks = {m.get("rank"): m for m in members}
        missing = [r for r in range(world) if r not in ranks]
        dead = sorted(r for r, m in ranks.items() if r is not None and not m["alive"])
        runs = {(m["version"], m.get("manifest_digest")) for m in members}
        state = (
            f"missing rank {', '.join(map(str, missing))}"
            if missing
            else f"dead rank {', '.join(map(str, dead))}"
            if dead
            else "split"
            if len(runs) > 1
            else "agreed"
        )
        found.append(
            {
                "group": name,
                "world": world,
                "state": state,
                "version": members[0]["version"] if state == "agreed" else None,
                "ranks": {str(r): m["agent_id"] for r, m in sorted(ranks.items(), key=_rank)},
            }
        )
    return found


def _rank(item: tuple[Any, Any]) -> int:
    return -1 if item[0] is None else int(item[0])


def safety_note(row: Mapping[str, Any]) -> str | None:
    """A row's track (when not "stable"), pin, health numbers and probe failures, compact;
    None when it has none of them (``hotswap status`` then shows no column for them).

    Example:
        >>> safety_note({"track": "canary", "pinned": 7, "health": {"error_rate": 0.5},
        ...     "probe_failures": 1, "last_probe": "v8: probe loss: 3.1 > 2.5"})
        'canary, pinned v7, error_rate=0.5, 1 probe failure (v8: probe loss: 3.1 > 2.5)'
        >>> safety_note({"track": "stable", "health": None, "probe_failures": 0}) is None
        True
    """
    parts = []
    if row.get("track") not in (None, "stable"):
        parts.append(str(row["track"]))
    if row.get("pinned") is not None:
        parts.append(f"pinned v{row['pinned']}")
    health = row.get("health")
    if health:
        parts.extend(f"{name}={value:.4g}" for name, value in sorted(health.items()))
    elif health is None and row.get("health_age") is not None:
        parts.append("health unknown (callback failed)")
    failures = row.get("probe_failures") or 0
    if failures:
        last = f" ({row['last_probe']})" if row.get("last_probe") else ""
        parts.append(f"{failures} probe failure{'s' if failures > 1 else ''}{last}")
    return ", ".join(parts) or None


def decode_record(agent_id: str, raw: bytes) -> AgentStatus:
    """An agent's record; one that does not decode is shown as "unreadable", not an error.

    Any agent's ACL user can write its record, so one bad record must not
    hide the others.
    """
    try:
        return st.decode(raw)
    except HotswapError as e:
        return AgentStatus(agent_id, "?", 0, state="unreadable", last_error=str(e))


def record_status(r: AgentRecord) -> AgentStatus:
    """An agent's record as shown; one that could not be read says why, as "unreadable"."""
    if r.data is None:
        return AgentStatus(r.agent_id, "?", 0, state="unreadable", last_error=r.problem)
    s = decode_record(r.agent_id, r.data)
    # The key names the agent: under a per-agent ACL user only that agent wrote it.
    return s if s.agent_id == r.agent_id else replace(s, agent_id=r.agent_id)


def agent_statuses(
    store: Store, report: AgentRecords | None = None
) -> list[tuple[AgentStatus, bool]]:
    """Every agent's record (from ``report``, else read), by agent id, and whether it is
    live (``status.live``: heartbeat alive and not stopped)."""
    read = store.agent_report() if report is None else report
    return [(s, st.live(s, r.alive)) for r in read.records for s in (record_status(r),)]


def status_view(
    store: Store, now: float | None = None, signing_keys: Sequence[bytes] = ()
) -> dict[str, Any]:
    """The model's head and lineage, and a row per agent that reported (JSON-able).

    Args:
        store: the model's store.
        now: the time heartbeat ages are counted to (default: the clock).
        signing_keys: the keys agents hold; with any, ``signing`` says what the
            signed head names and which stored versions these keys cannot
            verify (agents refuse them: a key removed strands what only it signed).

    Returns:
        ``{"model", "head", "lineage", "healthy", "unhealthy", "agents": [row,
        ...], "signing", "problems", "rollout", "groups"}``, as ``hotswap status --json`` prints it
        (``unhealthy``: see ``unhealthy_agents``; ``signing`` is None without
        keys; ``problems`` lists agent records that could not be read at all,
        such as a key of the wrong type; ``rollout``: the model's rollout in
        progress or lately ended, ``publisher.rolloutview``; ``groups``: see
        ``group_rows``).

    Example:
        >>> view = status_view(store, signing_keys=settings.key_bytes())  # doctest: +SKIP
        >>> [row["version"] for row in view["signing"]["unverifiable"]]  # doctest: +SKIP
        [1, 3]

    Raises:
        StoreUnavailable: Redis could not be reached.
        HotswapError: head's manifest could not be read.
    """
    head = store.head()
    lineage = store.manifest(head).lineage if head is not None else None
    now = time.time() if now is None else now
    report = store.agent_report()
    records = agent_statuses(store, report)
    stored = stored_digests(store, {s.version for s, _ in records if s.manifest_digest})
    agents = [agent_row(s, alive, head, lineage, now, stored=stored) for s, alive in records]
    signing = signing_view(store, signing_keys) if signing_keys else None
    unhealthy = unhealthy_agents(agents, head)
    return {
        "model": store.model,
        "head": head,
        "lineage": lineage,
        "healthy": not unhealthy,
        "unhealthy": unhealthy,
        "agents": agents,
        "signing": signing,
        "problems": report.problems,
        "rollout": rolloutview.view(store),
        "groups": group_rows(agents),
    }


def unhealthy_agents(rows: Iterable[Mapping[str, Any]], head: int | None) -> list[str]:
    """Why the fleet is not healthy: each live agent that rejected head or is diverged.

    ``hotswap status`` exits ``exitcodes.UNHEALTHY`` when this is not empty.
    An agent of another lineage, a dead one, or one still on its way to head
    is not counted: that is lag, which the table shows.

    Example:
        >>> unhealthy_agents([{"agent_id": "a", "alive": True, "same_lineage": True,
        ...     "diverged": False, "version": 1, "rejected_version": 2}], head=2)
        ['agent a rejected head v2 (runs v1)']
    """
    found = []
    for a in rows:
        if not a["alive"] or not a["same_lineage"]:
            continue
        runs = "nothing yet" if a["version"] is None else f"v{a['version']}"
        if a["diverged"]:
            found.append(f"agent {a['agent_id']} is diverged (its v{a['version']} is not Redis's)")
        elif head is not None and head in _rejected(a) and a["version"] != head:
            found.append(f"agent {a['agent_id']} rejected head v{head} (runs {runs})")
    return found


def _rejected(row: Mapping[str, Any]) -> list[int]:
    """The versions a row says its agent rejected (rows built by hand may lack the list)."""
    listed = list(row.get("rejected_versions") or [])
    return [*listed, row["rejected_version"]] if row.get("rejected_version") else listed


def signing_view(store: Store, signing_keys: Sequence[bytes]) -> dict[str, Any]:
    """What agents holding ``signing_keys`` make of the stored versions and the signed head.

    Returns:
        ``{"head": {...} or {"error": ...}, "unverifiable": [{"version", "reason"}]}``:
        the signed head record (version, lineage, issue and expiry times, key
        id) or why agents refuse it, and every stored version whose manifest
        these keys do not verify (signed only by a removed key, unsigned, altered).
    """
    unverifiable = []
    for v in store.versions():
        try:
            store.manifest(v, signing_keys)
        except NotFound:
            continue  # collected meanwhile
        except IntegrityError as e:
            unverifiable.append({"version": v, "reason": str(e)})
    return {"head": signed_head(store, signing_keys), "unverifiable": unverifiable}


def signed_head(store: Store, signing_keys: Sequence[bytes]) -> dict[str, Any]:
    """The signed head record as agents with ``signing_keys`` read it, or why they refuse it."""
    head, data = store.head_and_record()
    try:
        r = SignedHeads(store.model, signing_keys).decode(data, head)
    except IntegrityError as e:
        return {"error": str(e)}
    return {
        "version": r.version,
        "lineage": r.lineage,
        "manifest_digest": r.manifest,
        "issued": r.issued,
        "expires": r.expires,
        "key_id": r.key_id,
    }


def stored_digests(store: Store, versions: Iterable[int | None]) -> dict[int, str | None]:
    """The BLAKE3 digest of each version's stored manifest (None: not stored)."""
    found: dict[int, str | None] = {}
    for v in sorted({v for v in versions if v is not None and v > 0}):
        try:
            # codec.digest's BLAKE3, without importing torch with codec.
            found[v] = blake3.blake3(store.manifest_bytes(v)).hexdigest()
        except NotFound:
            found[v] = None
    return found
