"""publisher.await_fleet: each live agent's verdict (pure), and the wait's bounded backoff.

The verdicts are pure; the backoff test reads real records from Redis with a
clock moved by the pauses themselves, so nothing sleeps.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from agent_support import MODEL

from hotswap import status as st
from hotswap.errors import ValidationError
from hotswap.status import AgentStatus
from hotswap.store import Store
from hotswap.validate import rejection
from publisher import await_fleet as af


def agent(agent_id: str, version: int | None, state: str = "idle", **kw: Any) -> AgentStatus:
    return AgentStatus(agent_id, "h", 1, state=state, version=version, **kw)


def outcomes(records: list[tuple[AgentStatus, bool]], version: int = 8) -> list[tuple[str, str]]:
    return [(v.agent_id, v.outcome) for v in af.verdicts(records, version, "L", {8: "d8"})]


def test_each_live_agent_gets_one_verdict() -> None:
    records = [
        (agent("on", 8, lineage="L", manifest_digest="d8"), True),
        (agent("newer", 9, lineage="L"), True),
        (
            agent("refused", 7, lineage="L", rejected_version=8, rejection={"w": ["not finite"]}),
            True,
        ),
        (agent("older", 6, lineage="L", rejected_versions=[8, 7], rejected_version=7), True),
        (agent("behind", 7, lineage="L", state="fetching"), True),
        (agent("diverged", 8, lineage="L", manifest_digest="other"), True),
        (agent("elsewhere", 12, lineage="K"), True),
        (agent("dead", 3, lineage="L"), False),
        (agent("garbled", None, state="unreadable", last_error="not msgpack"), True),
    ]
    assert outcomes(records) == [
        ("on", "applied"),
        ("newer", "applied"),
        ("refused", "rejected"),
        ("older", "rejected"),
        ("behind", "waiting"),
        ("diverged", "waiting"),
        ("elsewhere", "waiting"),
        ("garbled", "unreadable"),
    ]
    found = {v.agent_id: v for v in af.verdicts(records, 8, "L", {8: "d8"})}
    assert found["refused"].reason == "w: not finite"
    assert found["older"].reason == "its record keeps the reason for v7 only"
    assert found["behind"].reason == "fetching, runs v7"
    assert found["diverged"].reason == "idle, runs v8 (diverged: not Redis's content)"
    assert found["elsewhere"].reason == "idle, runs v12 of another lineage"


def test_an_agent_that_refused_the_version_and_runs_a_newer_one_still_refused_it() -> None:
    s = agent("a", 9, lineage="L", rejected_versions=[8])
    assert outcomes([(s, True)]) == [("a", "rejected")]


def test_the_wait_settles_on_a_rejection_or_when_nobody_waits() -> None:
    applied, waiting = af.Verdict("a", af.APPLIED, 8), af.Verdict("b", af.WAITING, 7)
    rejected = af.Verdict("c", af.REJECTED, 7, "w: not finite")
    assert af.settled([]) and af.settled([applied]) and af.settled([waiting, rejected])
    assert not af.settled([applied, waiting])


def test_lines_name_every_agent_and_the_summary() -> None:
    r = af.FleetWait(
        "m",
        8,
        30,
        30.01,
        [af.Verdict("a", af.APPLIED, 8), af.Verdict("b", af.WAITING, 7, "fetching, runs v7")],
        timed_out=True,
    )
    assert not r.ok
    assert af.lines(r) == [
        "agent a: applied v8",
        "agent b: did not apply v8 within 30 s (fetching, runs v7)",
        "model m: not healthy: 1 of 2 live agents did not apply v8 (exit 4)",
    ]
    assert af.data(r)["problems"] == ["agent b: did not apply v8 within 30 s (fetching, runs v7)"]
    nobody = af.FleetWait("m", 8, 30, 0.0)
    assert nobody.ok and af.lines(nobody) == ["model m: no live agents: nobody to apply v8 yet"]


def test_the_wait_backs_off_to_a_bound_and_stops_at_its_timeout(store: Store) -> None:
    s = AgentStatus("slow", "h", 1, state="fetching", version=None, updated=time.time())
    store.write_agent_status("slow", st.encode(s), ttl=60)
    now = [0.0]
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    r = af.wait(store, 1, timeout=2.0, clock=lambda: now[0], pause=pause)
    assert r.timed_out and not r.ok and r.seconds == pytest.approx(2.0)
    assert pauses[:6] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.5]
    assert max(pauses) == af.MAX_PAUSE and sum(pauses) == pytest.approx(2.0)
    assert [v.reason for v in r.verdicts] == ["fetching, runs nothing yet"]
    assert store.model == MODEL


def test_a_rejection_of_the_whole_version_says_what_was_refused() -> None:
    why = "manifest of 'm' v3 is unsigned, but signing keys are configured"
    e = rejection("m", 3, {"<manifest>": [why]})
    assert isinstance(e, ValidationError) and e.reasons == {"<manifest>": [why]}
    assert str(e) == f"model 'm' v3 rejected: the manifest's signature or format: {why}"
    head = rejection("m", 3, {"<signed head>": ["expired"]})
    assert str(head) == "model 'm' v3 rejected: the signed head record: expired"
