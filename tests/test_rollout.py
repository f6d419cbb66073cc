"""Canary rollouts (issue 17) with agents in this process, against a real redis-server.

What the rollout decides and writes: pins for its canaries, a bake, widening
and promotion, or every pin taken back on a failure, with the canaries
reverted from host memory and nobody else having applied the version. The
same with serving processes of their own: tests/test_rollout_process.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from agent_support import MODEL, Ten, bump, snapshot, until

from hotswap import keys, pins
from hotswap.agent import Agent
from hotswap.errors import ConfigError
from hotswap.pins import Pin, PinIO
from hotswap.rollouts import Record, RolloutIO
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher
from publisher.rollout import Rollout, RolloutBusy, abort

Make = Callable[..., tuple[Ten, Agent, list[int]]]


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    with Publisher(MODEL, settings=settings) as p:
        yield p


@pytest.fixture
def fleet(settings: HotswapSettings) -> Iterator[Make]:
    """Builds started agents; each comes with the list of versions it applied, in order."""
    made: list[Agent] = []

    def build(name: str, track: str = "stable", **kwargs: Any) -> tuple[Ten, Agent, list[int]]:
        s = settings.model_copy(update={"track": track, "health_interval": 0.05})
        model, applied = Ten(), []
        agent = Agent(
            model,
            MODEL,
            settings=s,
            name=name,
            on_applied=lambda v, _r: applied.append(v),
            **kwargs,
        ).start()
        made.append(agent)
        return model, agent, applied

    yield build
    for agent in made:
        agent.stop()


def _v1_everywhere(pub: Publisher, agents: list[Agent]) -> int:
    v1 = pub.publish(bump(Ten().state_dict()))
    for agent in agents:
        assert agent.wait_for(v1, 10)
    return v1


def test_pins_parse_only_what_a_rollout_writes() -> None:
    assert pins.decode(b"7:6") == Pin(7, 6)
    for junk in (None, b"", b"7", b"7:", b":6", b"-1:6", b"7:6:5", b"x:6", b"1" * 30 + b":1"):
        assert pins.decode(junk) is None
    assert pins.follows(6, Pin(7, 6), None) == 7
    assert pins.follows(6, None, Pin(8, 6)) == 8
    assert pins.follows(6, Pin(7, 6), Pin(8, 6)) == 7  # the agent's own pin wins
    assert pins.follows(9, Pin(7, 6), Pin(8, 6)) == 9  # head moved: every pin ends


def test_an_unpromoted_version_runs_only_where_pinned(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    _, a, applied_a = fleet("a")
    _, b, applied_b = fleet("b")
    v1 = _v1_everywhere(pub, [a, b])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    assert store.head() == v1
    PinIO(store).write({pins.agent_field(a.agent_id): Pin(v2, v1)})
    assert a.wait_for(v2, 10)
    assert until(a, lambda: a.pinned_version == v2)
    # b heard the same notice and looked: it follows head, which did not move.
    assert until(b, lambda: b.head_version == v1)
    assert applied_b == [v1] and b.pinned_version is None
    # Taking the pin back reverts a from host memory, without refusing v2.
    PinIO(store).clear_all()
    assert until(a, lambda: a.applied_version == v1)
    assert applied_a == [v1, v2] and a.last_rejection is None


def test_a_garbled_pin_or_follow_key_is_ignored(fleet: Make, pub: Publisher, store: Store) -> None:
    _, a, applied = fleet("a")
    v1 = _v1_everywhere(pub, [a])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    follow = keys.follow_key(store.ns, store.model)
    store.client.hset(follow, pins.agent_field(a.agent_id), b"garbage")
    PinIO(store).write({})  # wakes the agents
    assert until(a, lambda: a.head_version == v1 and a.state == "idle")
    store.client.delete(follow)
    store.client.set(follow, b"not a hash")
    PinIO(store).write({}, [])  # would raise WRONGTYPE inside the script
    assert until(a, lambda: a.head_version == v1)
    assert applied == [v1] and store.head() == v1 and v2 > v1


def test_promoted_through_every_step(fleet: Make, pub: Publisher, store: Store) -> None:
    agents = [fleet(name) for name in ("a", "b", "c", "d")]
    v1 = _v1_everywhere(pub, [x[1] for x in agents])
    new = bump(Ten().state_dict(), 0.5)
    v2 = pub.publish(new, promote=False)
    said: list[str] = []
    outcome = Rollout(
        pub, v2, canary="1", steps=["50%"], bake=0.2, tick=0.02, say=said.append
    ).run()
    assert outcome.state == "promoted" and outcome.reason is None
    assert store.head() == v2
    for model, agent, applied in agents:
        assert agent.wait_for(v2, 10) and applied == [v1, v2]
        assert snapshot(model) == {n: t.numpy().tobytes() for n, t in new.items()}
    assert any("step 1 of 3 (1)" in s for s in said)
    assert any("step 2 of 3 (50%)" in s for s in said)
    assert PinIO(store).all() == {}
    record = RolloutIO(store).read()
    assert record is not None and record.state == "promoted" and len(record.members) == 2
    kinds = [row["kind"] for row in store.log(10)]
    assert "rollout started" in kinds and "rollout promoted" in kinds and "promote" in kinds


def test_a_probe_failure_on_a_canary_rolls_every_canary_back(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    v2_holder: list[int] = []

    def probe(model: Ten) -> str | None:
        return "answers got worse" if v2_holder else None

    model_c, canary_bad, _ = fleet("bad", track="canary", probes=[probe])
    model_ok, canary_ok, _ = fleet("ok", track="canary")
    others = [fleet(name) for name in ("x", "y")]
    v1 = _v1_everywhere(pub, [canary_bad, canary_ok, *(o[1] for o in others)])
    at_v1 = snapshot(model_ok)
    v2_holder.append(1)
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    outcome = Rollout(pub, v2, canary="1", bake=30, tick=0.02).run()
    assert outcome.state == "rolled_back"
    assert outcome.reason is not None and "canary" in outcome.reason
    assert "answers got worse" in outcome.reason
    assert store.head() == v1 and PinIO(store).all() == {}
    # The healthy canary applied v2 (or was about to) and is back on v1's bytes.
    assert until(canary_ok, lambda: canary_ok.applied_version == v1)
    assert snapshot(model_ok) == at_v1
    assert canary_bad.applied_version == v1
    assert canary_bad.last_rejection is not None
    for _, agent, applied in others:
        assert applied == [v1] and agent.applied_version == v1
    # The failing canary's probe put v1's bytes back before any reader saw v2.
    assert snapshot(model_c) == snapshot(model_ok)


def test_a_health_number_over_its_limit_rolls_back(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    holder: list[Agent] = []

    def health() -> dict[str, float]:
        # Errors rise once the canary runs v2.
        return {"error_rate": 0.5 if holder and holder[0].applied_version == 2 else 0.0}

    _, canary, _ = fleet("c", track="canary", health=health)
    holder.append(canary)
    _, other, applied_other = fleet("o")
    v1 = _v1_everywhere(pub, [canary, other])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    assert v2 == 2
    outcome = Rollout(pub, v2, canary="1", bake=30, tick=0.02, limits=["max:error_rate=0.1"]).run()
    assert outcome.state == "rolled_back"
    assert (
        outcome.reason
        == f"canary {canary.agent_id} reports error_rate=0.5, outside error_rate <= 0.1"
    )
    assert until(canary, lambda: canary.applied_version == v1)
    assert applied_other == [v1] and store.head() == v1


def test_a_second_rollout_is_refused_while_the_lease_lives(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    _, a, _ = fleet("a", track="canary")
    v1 = _v1_everywhere(pub, [a])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    first = Rollout(pub, v2, canary="1", bake=60, tick=0.02)
    ran = threading.Thread(target=first.run)
    ran.start()
    try:
        assert until(a, lambda: a.applied_version == v2)
        with pytest.raises(RolloutBusy, match="a rollout is driven by"):
            Rollout(pub, v2, canary="1", bake=1).run()
        with pytest.raises(RolloutBusy):
            abort(pub)
    finally:
        first.stop.set()
        ran.join(10)
    # Stopped: the rollout ends aborted, pins gone, the canary back on v1.
    record = RolloutIO(store).read()
    assert record is not None and record.state == "aborted"
    assert until(a, lambda: a.applied_version == v1) and store.head() == v1


def test_a_rollout_resumes_from_its_record_after_the_lease_expired(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    _, a, _ = fleet("a", track="canary")
    _, b, applied_b = fleet("b")
    v1 = _v1_everywhere(pub, [a, b])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    # A rollout that started, pinned its canary, and died holding a short lease.
    dead = Rollout(pub, v2, canary="1", bake=0.3, lease=0.3, tick=0.02)
    dead._take()
    record = dead._resume_or_begin()
    assert isinstance(record, Record)
    dead._start_step(record, dead._fleet(), dead.io.now())
    assert until(a, lambda: a.applied_version == v2)
    assert until(a, lambda: dead.io.lease() is None)  # the lease expired: nobody drives it
    with pytest.raises(ConfigError, match="the rollout of v2 is unfinished"):
        Rollout(pub, v1 + 5, canary="1").run()
    said: list[str] = []
    outcome = Rollout(pub, v2, canary="1", bake=0.3, tick=0.02, say=said.append).run()
    assert outcome.state == "promoted" and said[0].startswith("resuming the rollout of v2")
    assert b.wait_for(v2, 10) and applied_b == [v1, v2]


def test_a_newer_publish_during_a_rollout_supersedes_it(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    _, a, applied_a = fleet("a", track="canary")
    _, b, _ = fleet("b")
    v1 = _v1_everywhere(pub, [a, b])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    rollout = Rollout(pub, v2, canary="1", bake=60, tick=0.02)
    result: list[Any] = []
    ran = threading.Thread(target=lambda: result.append(rollout.run()))
    ran.start()
    assert until(a, lambda: a.applied_version == v2)
    v3 = pub.publish(bump(Ten().state_dict(), 0.7))
    ran.join(20)
    assert result and result[0].state == "superseded"
    assert f"head moved from v{v1} to v{v3}" in result[0].reason
    assert a.wait_for(v3, 10) and b.wait_for(v3, 10)
    assert applied_a == [v1, v2, v3]


def test_rollout_refuses_what_it_cannot_roll_out(fleet: Make, pub: Publisher, store: Store) -> None:
    _, a, _ = fleet("a")
    v1 = _v1_everywhere(pub, [a])
    with pytest.raises(ConfigError, match="has no v9"):
        Rollout(pub, 9).run()
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    v3 = pub.publish(bump(Ten().state_dict(), 0.7))  # promoted: head moved past v2's parent
    with pytest.raises(
        ConfigError, match=f"v{v2} was published on top of v{v1}, but head is v{v3}"
    ):
        Rollout(pub, v2).run()
    assert Rollout(pub, v3).run().state == "promoted"  # head already
    assert RolloutIO(store).read() is None and store.head() == v3
    with pytest.raises(ConfigError, match="rollout step 'ten'"):
        Rollout(pub, v3, canary="ten")


def test_status_shows_the_rollout_in_progress_and_how_it_ended(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    from rich.console import Console

    from publisher import render, views

    _, a, _ = fleet("a", track="canary")
    _v1_everywhere(pub, [a])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    rollout = Rollout(pub, v2, canary="1", bake=60, tick=0.02)
    ran = threading.Thread(target=rollout.run)
    ran.start()
    try:
        assert until(
            a, lambda: (views.status_view(store)["rollout"] or {}).get("bake_left") is not None
        )
        data = views.status_view(store)
        assert data["rollout"]["state"] == "running" and data["rollout"]["step"] == 1
        assert data["rollout"]["owner"]["id"] == rollout.io.owner
        console = Console(record=True, width=300)
        render.print_status(console, data)
        text = console.export_text()
        assert f"rollout of v{v2} from v1: step 1 of 2 (1), 1 agents pinned, baking" in text
        assert f"driven by {rollout.io.owner}" in text
    finally:
        rollout.stop.set()
        ran.join(10)
    ended = views.status_view(store)["rollout"]
    assert ended["state"] == "aborted" and ended["reason"] == "interrupted"


def test_pins_taken_back_right_after_a_look_are_followed_at_once(
    fleet: Make, pub: Publisher, store: Store
) -> None:
    """A pin notice is not paced like a notice that names nothing (one full look per
    pacing.LOOK_GAP): the agent reads head and its pins at once, and a promotion's
    notice ends the pin in the agent's record too. The agent's clock stands still, so
    no poll and no paced look could be what moved it."""
    _, a, applied = fleet("a", clock=lambda: 1000.0)
    v1 = _v1_everywhere(pub, [a])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    io = PinIO(store)
    io.write({pins.agent_field(a.agent_id): Pin(v2, v1)})
    assert a.wait_for(v2, 10)
    io.clear_all()  # within LOOK_GAP of the look that applied v2
    assert until(a, lambda: a.applied_version == v1)
    io.write({pins.agent_field(a.agent_id): Pin(v2, v1)})
    assert until(a, lambda: a.applied_version == v2 and a.reporter.status.pinned == v2)
    pub.promote(v2)
    assert until(a, lambda: a.head_version == v2 and a.reporter.status.pinned is None)
    assert applied == [v1, v2, v2] and a.pinned_version is None


def test_a_pin_taken_back_during_the_fetch_is_not_applied(
    settings: HotswapSettings, pub: Publisher, store: Store
) -> None:
    """The agent reads head and its pins again just before applying a pinned version: a
    rollout that rolled back while the canary fetched leaves it on what it ran, with
    nothing applied and nothing to revert."""
    from agent_support import watched_agent

    model = {f"w{i}": torch.zeros(512, 1024) for i in range(2)}  # read whole, not prefetched
    applied: list[int] = []
    agent, watch = watched_agent(model, settings, on_applied=lambda v, _r: applied.append(v))
    with agent:
        v1 = pub.publish({k: torch.full_like(t, 1.0) for k, t in model.items()})
        assert agent.wait_for(v1, 10)
        # New random values: stored full (a delta's frames take another read path).
        g = torch.Generator().manual_seed(2)
        fresh = {k: torch.randn(t.shape, generator=g) for k, t in model.items()}
        v2 = pub.publish(fresh, promote=False)
        taken: list[bool] = []

        def take_back(_entry: object) -> None:
            if not taken:  # during v2's fetch: the rollout rolls back
                taken.append(True)
                PinIO(store).clear_all()

        watch.before_read = take_back
        PinIO(store).write({pins.agent_field(agent.agent_id): Pin(v2, v1)})
        assert until(agent, lambda: bool(taken) and agent.pinned_version is None)
        assert applied == [v1] and agent.applied_version == v1
        assert all(torch.equal(t, torch.full_like(t, 1.0)) for t in model.values())
        assert agent.last_rejection is None  # not refused: a later rollout may offer it


def test_bad_rollout_arguments_are_usage_errors_that_change_nothing(
    fleet: Make, pub: Publisher, store: Store, settings: HotswapSettings, capsys: Any
) -> None:
    from publisher.cli import main

    _, a, _ = fleet("a", track="canary")
    v1 = _v1_everywhere(pub, [a])
    v2 = pub.publish(bump(Ten().state_dict(), 0.5), promote=False)
    url = ["--redis-url", settings.redis_url]
    for argv, said in (
        (["rollout", MODEL, str(v2), "--bake", "soon", *url], "is not a duration"),
        (["rollout", MODEL, "0", *url], "version must be 1 or more, got 0"),
    ):
        assert main(argv) == 2
        assert said in capsys.readouterr().err
    assert RolloutIO(store).read() is None and PinIO(store).all() == {}
    assert store.head() == v1 and a.applied_version == v1
