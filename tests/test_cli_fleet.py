"""Issue 15: rollback that knows the fleet, and ``status`` exit 4, on real agent records.

One test runs a real agent (it rejects two NaN versions); the others write the
records agents write (``Store.write_agent_status``) for fleets too slow to
grow by hand: mixed versions, dead agents, older agents' records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import test_cli
import torch
from agent_support import MODEL, Ten, Watch, bump, cloned, equal_state, status_of

from hotswap import status as st
from hotswap.agent import Agent
from hotswap.errors import NotFound, ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

# The command-line fixtures of test_cli: the real environment, the in-process command.
env = test_cli.env
run = test_cli.run


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher(MODEL, settings=settings, connection=client)
    yield p
    p.close()


def nan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = {k: v.clone() for k, v in state.items()}
    bad["layers.2.weight"][3, 3] = float("nan")
    return bad


def versions(pub: Publisher, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` versions of Ten, each a little different (v1..vcount)."""
    sd = cloned(Ten())
    out = []
    for i in range(count):
        sd = bump(sd, 0.01 * (i + 1))
        out.append(sd)
        pub.publish(sd, force=True)
    return out


def record(
    store: Store,
    agent_id: str,
    version: int | None,
    *,
    rejected: list[int] | None = None,
    last_rejected: int | None = None,
    ttl: float = 60,
) -> None:
    """An agent's record as an agent writes it (``rejected``: its recent rejections;
    ``last_rejected`` alone: an agent older than ``rejected_versions``)."""
    lineage = store.manifest(store.head() or 1).lineage
    s = st.AgentStatus(
        agent_id,
        "host",
        1,
        state="idle",
        version=version,
        lineage=lineage,
        rejected_version=last_rejected or (rejected[-1] if rejected else None),
        rejected_versions=rejected,
        updated=time.time(),
    )
    store.write_agent_status(agent_id, st.encode(s), ttl=ttl)


def test_a_real_agent_rejects_two_versions_and_rollback_goes_past_both(
    settings: HotswapSettings, pub: Publisher, store: Store, run: Any
) -> None:
    model = Ten()
    agent = Agent(model, MODEL, settings=settings, store_factory=Watch().factory).start()
    try:
        good = bump(model.state_dict())
        assert agent.wait_for(pub.publish(cloned(model)), 10)  # v1
        assert agent.wait_for(pub.publish(good), 10)  # v2
        for i in range(2):  # v3, v4: NaN, rejected
            with pytest.raises(ValidationError):
                agent.wait_for(pub.publish(nan(bump(good, 0.01 * (i + 1))), force=True), 10)
        s = status_of(store, agent, lambda s: s.rejected_version == 4)
        assert (s.version, s.rejected_versions, s.rejected_tensors) == (2, [3, 4], 1)
        code, out, err = run("status", "m")
        assert (
            code == 4 and f"not healthy: agent {agent.agent_id} rejected head v4 (runs v2)" in out
        )
        code, out, err = run("rollback", "m")  # waits for the live agent by default
        assert (code, err) == (0, "")
        first, why, applied, done = out.splitlines()
        assert first.startswith("model m: rolled back to v2 as v5 (")
        assert why == f"model m: chose v2, passing over v3: rejected by agent {agent.agent_id}"
        assert applied == f"agent {agent.agent_id}: applied v5"
        assert done.startswith("model m: the live agent applied v5 (")
        assert agent.wait_for(5, 10) and equal_state(model, good)
        status_of(store, agent, lambda s: s.version == 5)
        code, out, _ = run("status", "m", "--json")
        assert code == 0 and json.loads(out)["unhealthy"] == []
    finally:
        agent.stop()


def test_a_version_no_live_agent_ran_is_passed_over_when_agents_run_an_older_one(
    pub: Publisher, store: Store, run: Any
) -> None:
    versions(pub, 4)
    # v4 (head) rejected; v3 rejected by an agent older than rejected_versions (it says
    # only its last); v2 never reached anyone (agents went from v1 straight to v3).
    record(store, "srv-a", 1, rejected=[3, 4])
    record(store, "srv-b", 1, last_rejected=4)
    code, out, _ = run("rollback", "m", "--json", "--no-wait")
    assert code == 0
    data = json.loads(out)
    assert (data["rollback_to"], data["version"]) == (1, 5)
    assert data["skipped"] == {"3": "rejected by agent srv-a", "2": "not applied by any agent"}
    assert store.log(1)[0]["message"] == (
        "rollback to v1 (skipped v3: rejected by agent srv-a; v2: not applied by any agent)"
    )


def test_a_mixed_fleet_goes_back_to_what_every_agent_accepted(
    pub: Publisher, store: Store, run: Any
) -> None:
    versions(pub, 4)
    record(store, "srv-new", 3, rejected=[4])
    record(store, "srv-old", 1, rejected=[2, 3, 4])
    record(store, "srv-dead", 2, rejected=[2], ttl=0.001)  # its rejection still counts
    for _ in range(100_000):  # its heartbeat lives 1 ms: ask until it has expired
        if not {a: alive for a, _, alive in store.agent_records()}["srv-dead"]:
            break
    code, out, _ = run("rollback", "m", "--no-wait")
    assert code == 0
    assert out.splitlines()[1] == (
        "model m: chose v1, passing over v3: rejected by agent srv-old; "
        "v2: rejected by agents srv-dead, srv-old"
    )


def test_with_every_agent_on_head_the_version_before_is_chosen(
    pub: Publisher, store: Store, run: Any
) -> None:
    versions(pub, 3)
    record(store, "srv-a", 3)
    record(store, "srv-dead-long-ago", 1, ttl=0.001)  # what the dead ran says nothing
    code, out, _ = run("rollback", "m", "--json", "--no-wait")
    assert code == 0 and json.loads(out)["rollback_to"] == 2
    assert json.loads(out)["skipped"] == {}


def test_nothing_left_to_roll_back_to_is_an_error_that_lists_why(
    pub: Publisher, store: Store, run: Any, client: redis.Redis
) -> None:
    versions(pub, 3)
    record(store, "srv-a", 3, rejected=[1, 2])
    before = {k: client.dump(k) for k in client.keys("*") if b"status" not in k}
    code, out, err = run("rollback", "m")
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'm': no earlier version to roll back to from v3 (skipped v2, "
        "v1: rejected by agent srv-a); pass --to VERSION (to=...) to pick one\n"
    )
    assert {k: client.dump(k) for k in client.keys("*") if b"status" not in k} == before
    with pytest.raises(NotFound):
        pub.rollback()
    # --to is not second-guessed.
    assert run("rollback", "m", "--to", "1", "--no-wait")[0] == 0
    assert store.manifest(4).rollback_to == 1


def test_status_exit_4_only_for_live_agents_that_rejected_head_or_diverged(
    pub: Publisher, store: Store, run: Any
) -> None:
    versions(pub, 2)
    record(store, "srv-a", 2)
    record(store, "srv-b", 1)  # lagging (on its way): healthy
    assert run("status", "m")[0] == 0
    record(store, "srv-gone", 1, rejected=[2], ttl=0.001)
    for _ in range(100_000):
        if not {a: alive for a, _, alive in store.agent_records()}["srv-gone"]:
            break
    assert run("status", "m")[0] == 0  # dead: not the fleet
    record(store, "srv-b", 1, rejected=[2])
    code, out, _ = run("status", "m", "--json")
    data = json.loads(out)
    assert code == 4 and data["healthy"] is False
    assert data["unhealthy"] == ["agent srv-b rejected head v2 (runs v1)"]
    row = next(a for a in data["agents"] if a["agent_id"] == "srv-b")
    assert row["rejected_versions"] == [2] and isinstance(row["pid"], int)


def test_the_rejection_counts_every_tensor_not_just_those_the_record_keeps(
    pub: Publisher, store: Store, run: Any
) -> None:
    versions(pub, 1)
    s = st.AgentStatus(
        "srv-a",
        "h",
        1,
        version=None,
        rejected_version=1,
        rejection={f"t{i:03}": ["not finite"] for i in range(50)},
        rejected_tensors=199,
        updated=time.time(),
    )
    store.write_agent_status("srv-a", st.encode(s), ttl=60)
    code, out, _ = run("status", "m", "--json")
    row = json.loads(out)["agents"][0]
    assert code == 4 and row["last_rejection"] == "t000: not finite (+198 more tensors)"
