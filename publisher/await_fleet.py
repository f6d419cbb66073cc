"""Waiting for the fleet to take a version: each live agent's verdict, read from its record.

``hotswap publish --wait`` and ``hotswap rollback`` (by default) call ``wait``
after the commit. It reads every agent's status record until each live agent
(``status.live``: heartbeat alive, not stopped) runs the version, or any
rejected it, or the timeout passes; then says what each one did. A publish
that every agent refuses is not a success a script may take for one.
``verdicts`` is the pure step; ``wait`` only reads Redis, never writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from hotswap import status as st
from hotswap.errors import HotswapError
from hotswap.status import AgentStatus
from hotswap.store import Store
from publisher import views

# How long the CLI waits when given ``--wait`` without seconds, and rollback by default.
DEFAULT_TIMEOUT = 60.0
# The pause between two reads of the records: doubling from FIRST_PAUSE up to
# MAX_PAUSE, so a quick fleet is seen at once and a slow one is not hammered.
FIRST_PAUSE = 0.02
MAX_PAUSE = 0.5

APPLIED = "applied"
REJECTED = "rejected"
WAITING = "waiting"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Verdict:
    """What one live agent did with the version: applied, rejected, still waiting
    (at the end of the wait: did not apply it), or its record cannot be read."""

    agent_id: str
    outcome: str
    runs: int | None
    reason: str | None = None


@dataclass(frozen=True)
class FleetWait:
    """The end of a wait for ``version``: every live agent's verdict.

    ``ok`` holds when every live agent applied it (or none is live).
    """

    model: str
    version: int
    timeout: float
    seconds: float
    verdicts: list[Verdict] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return all(v.outcome == APPLIED for v in self.verdicts)

    def problems(self) -> list[str]:
        """One phrase per live agent that did not apply the version, and why."""
        return [_problem(self, v) for v in self.verdicts if v.outcome != APPLIED]


def verdicts(
    records: Iterable[tuple[AgentStatus, bool]],
    version: int,
    lineage: str | None,
    stored: dict[int, str | None],
) -> list[Verdict]:
    """Each live agent's verdict on ``version`` (of ``lineage``) from its record.

    An agent applied the version when its record names it, or a later one of
    the same lineage and the agent did not reject this one, with the manifest
    Redis stores (``views.diverged``).

    Example:
        >>> a = AgentStatus("a", "h", 1, state="idle", version=7, rejected_versions=[8])
        >>> [v.outcome for v in verdicts([(a, True)], 8, None, {})]
        ['rejected']
    """
    found = []
    for s, live in records:
        if not live:
            continue
        if s.state == "unreadable":
            found.append(Verdict(s.agent_id, UNREADABLE, None, s.last_error))
            continue
        same = lineage is None or s.lineage is None or s.lineage == lineage
        runs, refused = s.version, version in st.rejected(s)
        ran = same and runs is not None and not views.diverged(s, stored)
        if ran and (runs == version or (runs is not None and runs > version and not refused)):
            found.append(Verdict(s.agent_id, APPLIED, runs))
        elif refused:
            found.append(Verdict(s.agent_id, REJECTED, runs, _rejection(s, version)))
        else:
            found.append(Verdict(s.agent_id, WAITING, runs, _doing(s, same, stored)))
    return found


def _rejection(s: AgentStatus, version: int) -> str:
    if s.rejected_version == version:
        return views.rejection_reason(s) or s.last_error or "no reason recorded"
    # The record keeps the reasons of its last rejection only.
    return f"its record keeps the reason for v{s.rejected_version} only"


def _doing(s: AgentStatus, same: bool, stored: dict[int, str | None]) -> str:
    runs = "nothing yet" if s.version is None else f"v{s.version}"
    if not same:
        runs += " of another lineage"
    elif views.diverged(s, stored):
        runs += " (diverged: not Redis's content)"
    error = f": {s.last_error}" if s.last_error else ""
    return f"{s.state}, runs {runs}{error}"


def settled(found: list[Verdict]) -> bool:
    """Whether waiting longer can change the answer: a rejection, or no agent still waiting."""
    return any(v.outcome == REJECTED for v in found) or all(v.outcome != WAITING for v in found)


def wait(
    store: Store,
    version: int,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> FleetWait:
    """Read the agents' records until the live ones have taken ``version`` (see module).

    Args:
        store: the model's store.
        version: the version committed.
        timeout: seconds to wait at most; agents still without a verdict then
            are reported as not having applied it.
        clock, pause: the time source and the wait between reads (tests).

    Example:
        >>> r = wait(pub.store, pub.publish(state), timeout=30)  # doctest: +SKIP
        >>> r.ok, [(v.agent_id, v.outcome) for v in r.verdicts]  # doctest: +SKIP
        (False, [('web-1', 'rejected')])

    Raises:
        StoreUnavailable: Redis could not be reached.
    """
    start = clock()
    lineage = _lineage(store, version)
    delay = FIRST_PAUSE
    while True:
        records = views.agent_statuses(store)
        stored = views.stored_digests(store, {s.version for s, live in records if live})
        found = verdicts(records, version, lineage, stored)
        now = clock()
        done = settled(found)
        if done or now - start >= timeout:
            return FleetWait(store.model, version, timeout, now - start, found, not done)
        pause(min(delay, timeout - (now - start)))
        delay = min(delay * 2, MAX_PAUSE)


def _lineage(store: Store, version: int) -> str | None:
    try:
        return store.manifest(version).lineage
    except HotswapError:
        return None  # collected or garbled meanwhile: versions compared by number only


# -- what the CLI prints --------------------------------------------------------


def data(r: FleetWait) -> dict[str, Any]:
    """The wait as ``--json`` gives it (``fleet`` of publish and rollback)."""
    return {
        "version": r.version,
        "ok": r.ok,
        "live_agents": len(r.verdicts),
        "timeout": r.timeout,
        "timed_out": r.timed_out,
        "seconds": round(r.seconds, 3),
        "verdicts": [asdict(v) for v in r.verdicts],
        "problems": r.problems(),
    }


def lines(r: FleetWait) -> list[str]:
    """A line per live agent, then the summary (text from records: print it as plain)."""
    out = []
    for v in r.verdicts:
        if v.outcome == APPLIED:
            newer = "" if v.runs == r.version else f" (runs v{v.runs}, newer)"
            out.append(f"agent {v.agent_id}: applied v{r.version}{newer}")
        else:
            out.append(_problem(r, v))
    if not r.verdicts:
        out.append(f"model {r.model}: no live agents: nobody to apply v{r.version} yet")
    elif r.ok:
        n = len(r.verdicts)
        every = "the live agent" if n == 1 else f"all {n} live agents"
        out.append(f"model {r.model}: {every} applied v{r.version} ({r.seconds:.2f}s)")
    else:
        bad = len(r.problems())
        out.append(
            f"model {r.model}: not healthy: {bad} of {len(r.verdicts)} live agents did not "
            f"apply v{r.version} (exit 4)"
        )
    return out


def _problem(r: FleetWait, v: Verdict) -> str:
    if v.outcome == REJECTED:
        return f"agent {v.agent_id}: rejected v{r.version}: {v.reason}"
    if v.outcome == UNREADABLE:
        return f"agent {v.agent_id}: its record cannot be read: {v.reason}"
    if r.timed_out:
        return f"agent {v.agent_id}: did not apply v{r.version} within {r.timeout:g} s ({v.reason})"
    ended = "yet when another rejected it"
    return f"agent {v.agent_id}: had not applied v{r.version} {ended} ({v.reason})"
