"""Group apply (issue 19): tensor-parallel ranks in processes of their own, on gloo, switch
versions as one or not at all; the decision itself, the bounded pending versions and
how ``hotswap status`` shows a group.

Each rank's agent takes only its slice (``shards=``, ``tests/group_worker.py``), so
a NaN in one rank's rows is seen, and refused, by that rank alone; the one-rank
probe failure is a value only that rank's slice holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from agent_support import MODEL, Ten, bump, equal_state, until
from group_worker import full, reference
from waiting import poll

from hotswap import status as st
from hotswap.agent import Agent
from hotswap.errors import ConfigError, FormatError
from hotswap.group import (
    GROUP,
    MAX_REFUSALS,
    OFFER_BYTES,
    GroupError,
    Offer,
    decide,
    decode_offer,
    encode_offer,
    needed,
)
from hotswap.postapply import Probation
from hotswap.runstate import KEEP_PENDING
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import render, views
from publisher.publisher import Publisher

WORKER = Path(__file__).parent / "group_worker.py"
# The group's forward pass sums partial products in another order than the
# single-process reference: float32 rounding, no more.
ATOL, RTOL = 1e-5, 1e-5


class Rank:
    """One rank's process: send a command, read its one-line JSON reply."""

    def __init__(self, url: str, init: Path, rank: int, world: int, slow: int) -> None:
        args = [sys.executable, str(WORKER), url, str(init), str(rank), str(world), str(slow)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.rank = rank

    def ready(self) -> str:
        return str(self.read()["ready"])

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"rank {self.rank} exited with {self.proc.wait(10)}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(15)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class Group:
    """``world`` ranks; ``all(cmd)`` sends to every live rank first, then reads each reply
    (a collective needs every rank inside it at once)."""

    def __init__(self, ranks: list[Rank]) -> None:
        self.ranks = ranks
        self.ids = [r.ready() for r in ranks]

    def all(self, cmd: str, **fields: Any) -> list[dict[str, Any]]:
        live = [r for r in self.ranks if r.proc.poll() is None]
        for r in live:
            r.send(cmd, **fields)
        return [r.read() for r in live]

    def pending(self, version: int, ranks: list[int] | None = None) -> None:
        for i in range(len(self.ranks)) if ranks is None else ranks:
            assert self.ranks[i]("pending", version=version)["ok"], (
                f"rank {i} never held v{version}"
            )


@pytest.fixture
def group_of(settings: HotswapSettings, tmp_path: Path) -> Iterator[Any]:
    started: list[Rank] = []

    def start(world: int, slow: int = -1) -> Group:
        init = tmp_path / f"init-{world}"
        ranks = [Rank(settings.redis_url, init, r, world, slow) for r in range(world)]
        started.extend(ranks)
        return Group(ranks)

    yield start
    for r in started:
        r.close()


def close_to(out: list[list[float]], weights: dict[str, torch.Tensor]) -> bool:
    return torch.allclose(torch.tensor(out), reference(weights), atol=ATOL, rtol=RTOL)


def with_value(weights: dict[str, torch.Tensor], row: int, value: float) -> dict[str, torch.Tensor]:
    """``weights`` with ``l0.weight[row, 0] = value``: in the slice of the rank whose rows
    hold ``row``."""
    changed = {k: t.clone() for k, t in weights.items()}
    changed["l0.weight"][row, 0] = value
    return changed


# -- the decision, pure --------------------------------------------------------------


def _offer(pending: list[int], refused: dict[int, str] | None = None) -> Offer:
    return Offer(
        "a",
        [("L", v, f"d{v}") for v in pending],
        [(("L", v, f"d{v}"), why) for v, why in (refused or {}).items()],
        None,
    )


def test_the_group_picks_the_newest_version_every_rank_holds_and_none_refused() -> None:
    assert decide([_offer([1, 2, 3]), _offer([2, 3]), _offer([1, 2])]).chosen == ("L", 2, "d2")
    assert decide([_offer([2, 3]), _offer([1])]).chosen is None
    assert decide([_offer([]), _offer([1])]).chosen is None
    both = decide([_offer([2, 3]), _offer([2], {3: "nan"}), _offer([2, 3], {3: "big"})])
    assert both.chosen == ("L", 2, "d2")
    # The first refusing rank's reason, for every rank.
    assert both.refused == {("L", 3, "d3"): "rank 1: nan"}
    # Same number, other manifest (Redis restored): not the same version.
    other = Offer("b", [("L", 3, "other")], [], None)
    assert decide([_offer([3]), other]).chosen is None
    # Rank 0's order decides between lineages, not the numbers.
    new = Offer("a", [("L", 9, "d9"), ("M", 1, "m1")], [], None)
    assert decide([new, new]).chosen == ("M", 1, "m1")


def test_each_rank_keeps_what_the_others_stage_and_hold_newest() -> None:
    slow = Offer("b", [("L", 1, "d1"), ("L", 2, "d2")], [], None, staging=("L", 7, "d7"))
    fast = Offer("a", [("L", 6, "d6"), ("L", 8, "d8")], [], None)
    assert needed([fast, slow], 0) == {("L", 2, "d2"), ("L", 7, "d7")}
    assert needed([fast, slow], 1) == {("L", 8, "d8")}
    assert needed([fast], 0) == set()
    back = decode_offer(encode_offer(slow))
    assert back.staging == ("L", 7, "d7") and back.pending == slow.pending


def test_an_offer_fits_its_fixed_size_and_garbage_is_refused() -> None:
    offer = Offer("rank0", [("L", 1, "d" * 64)], [(("L", 2, "e" * 64), "x" * 5000)] * 50, None)
    data = encode_offer(offer)
    assert len(data) <= OFFER_BYTES
    back = decode_offer(data)
    assert back.pending == offer.pending and len(back.refused) == MAX_REFUSALS
    assert back.refused[0][1] == "x" * 300
    with pytest.raises(
        GroupError, match=r"^a rank's offer does not decode \(KeyError: 'pending'\)"
    ):
        decode_offer(bytes(msgpack.packb({"agent": "a"})))
    with pytest.raises(GroupError, match=r"^a rank's offer does not decode \(TypeError"):
        decode_offer(bytes(msgpack.packb({**_raw(), "pending": [["L", "1", "d"]]})))


def _raw() -> dict[str, Any]:
    return {"agent": "a", "pending": [], "refused": [], "running": None, "error": None}


# -- status -----------------------------------------------------------------------------


def test_status_records_carry_the_group_and_older_records_still_decode() -> None:
    s = st.AgentStatus("a", "h", 1, group="rank0", rank=1, world=2)
    assert st.decode(st.encode(s)) == s
    old = {"agent_id": "a", "host": "h", "pid": 1, "state": "idle"}
    back = st.decode(bytes(msgpack.packb(old)))
    assert (back.group, back.rank, back.world) == (None, None, None)
    for field, bad in (("rank", -1), ("world", "2"), ("group", "a b")):
        with pytest.raises(FormatError, match=f"^agent status field '{field}' has a bad value"):
            st.decode(bytes(msgpack.packb({**old, field: bad})))


def _row(rank: int, version: int | None = 3, alive: bool = True) -> dict[str, Any]:
    return {
        "agent_id": f"r{rank}",
        "group": "g",
        "rank": rank,
        "world": 3,
        "alive": alive,
        "version": version,
        "manifest_digest": None if version is None else f"d{version}",
    }


def test_status_shows_a_groups_version_only_when_every_rank_agrees() -> None:
    def seen(rows: list[dict[str, Any]]) -> tuple[str, int | None]:
        (g,) = views.group_rows([*rows, {"agent_id": "solo", "group": None, "alive": True}])
        return g["state"], g["version"]

    assert seen([_row(0), _row(1), _row(2)]) == ("agreed", 3)
    assert seen([_row(0), _row(2)]) == ("missing rank 1", None)
    assert seen([_row(0), _row(1, alive=False), _row(2)]) == ("dead rank 1", None)
    assert seen([_row(0), _row(1, version=4), _row(2)]) == ("split", None)
    assert seen([_row(0, None), _row(1, None), _row(2, None)]) == ("agreed", None)
    lines = render.group_lines(views.group_rows([_row(0), _row(2)]))
    assert [t.plain for t in lines] == ["group g (3 ranks): no version (missing rank 1)"]


# -- manual mode keeps a few pending versions ----------------------------------------


def test_manual_mode_keeps_the_newest_few_valid_versions_and_applies_the_newest(
    settings: HotswapSettings,
) -> None:
    model = Ten()
    with (
        Publisher(MODEL, settings=settings) as pub,
        Agent(model, MODEL, settings=settings, mode="manual") as agent,
    ):
        published = []
        for step in range(1, KEEP_PENDING + 3):
            published.append(pub.publish(bump(model.state_dict(), 0.01 * step)))
            v = published[-1]
            assert until(agent, lambda v=v: agent.pending_version == v)  # type: ignore[misc]
        held = [p[1] for p in agent._pipeline.state.pending()]
        assert held == published[-KEEP_PENDING:]
        assert agent.applied_version is None
        assert agent.apply_pending() == published[-1]
        assert agent._pipeline.state.pending() == []
        assert equal_state(model, bump(Ten().state_dict(), 0.01 * (KEEP_PENDING + 2)))
        assert agent.apply_pending() is None


# -- processes ----------------------------------------------------------------------


def test_two_ranks_apply_together_refuse_together_revert_together_and_outlast_a_stop(
    settings: HotswapSettings, store: Store, group_of: Any
) -> None:
    g = group_of(2)
    with Publisher("m", settings=settings) as pub:
        for seed in (1, 2):
            v = pub.publish(full(seed))
            g.pending(v)
            replies = g.all("step")
            assert [r["applied"] for r in replies] == [v, v]
            assert all(close_to(r["out"], full(seed)) for r in replies)
        good = v
        # Rank 1 holds rows 4-7 of l0: only it sees the NaN.
        bad = pub.publish(with_value(full(3), 6, float("nan")))
        g.pending(bad, ranks=[0])
        assert g.ranks[1]("refused", version=bad)["ok"]
        replies = g.all("step")
        assert [r["applied"] for r in replies] == [None, None]
        assert [r["version"] for r in replies] == [good, good]
        assert all(close_to(r["out"], full(2)) for r in replies)
        assert replies[0]["pending"] == []  # dropped: the group refused it
        assert replies[0]["rejection"] == {
            GROUP: ["rank 1: l0.weight: 1 of 32 values are not finite (NaN or inf)"]
        }
        # Valid everywhere, but rank 0's probe fails on its slice: both put it back.
        probed = pub.publish(with_value(full(4), 1, 500.0))
        g.pending(probed)
        replies = g.all("step")
        assert [r["applied"] for r in replies] == [None, None]
        assert [r["version"] for r in replies] == [good, good]
        assert all(close_to(r["out"], full(2)) for r in replies)
        assert all(
            "rank 0: probe probe: a weight of 500 on rank 0" in json.dumps(r["rejection"])
            for r in replies
        )
        assert [r["rejected"][-1] for r in replies] == [probed, probed]
        later = pub.publish(full(5))
        g.pending(later)
        assert [r["applied"] for r in g.all("step")] == [later, later]
    replies = g.all("revert")
    assert [r["back"] for r in replies] == [good, good]
    assert all(close_to(r["out"], full(2)) for r in replies)
    # Both reported one group, agreed on what runs.
    assert poll(lambda: _groups(store) == [("agreed", good, 2)], 500)
    # Rank 1's agent stops (its thread ends): the group stays on what it runs.
    g.ranks[1]("stop")
    with Publisher("m", settings=settings) as pub:
        after = pub.publish(full(6))
    g.pending(after, ranks=[0])
    replies = g.all("step")
    assert [r["applied"] for r in replies] == [None, None]
    assert [r["version"] for r in replies] == [good, good]
    assert all(close_to(r["out"], full(2)) for r in replies)
    assert poll(lambda: _groups(store) == [("dead rank 1", None, 2)], 500)


def _groups(store: Store) -> list[tuple[str, int | None, int]]:
    rows = views.status_view(store)["groups"]
    return [(g["state"], g["version"], g["world"]) for g in rows]


def test_four_ranks_wait_for_a_slow_rank_stay_on_a_failed_one_and_never_apply_alone(
    settings: HotswapSettings, store: Store, group_of: Any
) -> None:
    g = group_of(4, slow=3)  # rank 3 validates each tensor in 0.3 s
    with Publisher("m", settings=settings) as pub:
        v1 = pub.publish(full(1))
        g.pending(v1, ranks=[0])
        steps = [g.all("step")]
        while steps[-1][0]["applied"] is None and len(steps) < 200:
            steps.append(g.all("step"))
        # Delayed by the slow rank, never split: every step the same on every rank.
        assert len(steps) > 1 and steps[-1][0]["applied"] == v1
        for replies in steps:
            assert len({r["applied"] for r in replies}) == 1
            assert len({r["version"] for r in replies}) == 1
        assert all(close_to(r["out"], full(1)) for r in steps[-1])
        # Rank 2's reads from Redis fail: the others stage v2, the group stays on v1.
        assert g.ranks[2]("fail")["version"] == v1
        v2 = pub.publish(full(2))
        g.pending(v2, ranks=[0, 1, 3])
        assert poll(lambda: "ConnectionError" in (g.ranks[2]("state")["last_error"] or ""), 300)
        replies = g.all("step")
        assert [r["applied"] for r in replies] == [None] * 4
        assert [r["version"] for r in replies] == [v1] * 4
        assert all(close_to(r["out"], full(1)) for r in replies)
        # Rank 2 recovers and stages v2 too; then rank 1 is killed outright: the others'
        # collective times out (3 s) and none applies v2 alone.
        g.ranks[2]("heal")
        g.pending(v2, ranks=[2])
    assert poll(lambda: _groups(store) == [("agreed", v1, 4)], 400)
    g.ranks[1].proc.kill()
    g.ranks[1].proc.wait(10)
    replies = g.all("step")
    assert len(replies) == 3
    assert all(r["error"].startswith("GroupError: the group's all_gather failed") for r in replies)
    assert [r["version"] for r in replies] == [v1] * 3
    assert [r["pending"] for r in replies] == [[v2]] * 3
    assert poll(lambda: _groups(store)[0][:2] == ("dead rank 1", None), 400)


def test_an_apply_of_an_older_pending_version_stages_the_newer_one_again(
    settings: HotswapSettings,
) -> None:
    """What a group's choice of a version some rank holds older than its newest does
    on that rank: the newer one, planned against what ran, is dropped and staged again."""
    model = Ten()
    with (
        Publisher(MODEL, settings=settings) as pub,
        Agent(model, MODEL, settings=settings, mode="manual") as agent,
    ):
        state = agent._pipeline.state
        first = bump(model.state_dict(), 0.01)
        v1 = pub.publish(first)
        assert until(agent, lambda: agent.pending_version == v1)
        v2 = pub.publish(bump(model.state_dict(), 0.02))
        assert until(agent, lambda: agent.pending_version == v2)
        older = state.pending()[0]
        assert older[1] == v1
        assert not state.begin_apply_pending()
        try:
            ready, others = state.choose(older[2])
            assert ready is not None and len(others) == 1 and state.pending() == []
            for staged in others:
                staged.release()
            agent._pipeline.apply(ready)
            ready.staged.release()
        finally:
            state.end_apply_pending()
        assert agent.applied_version == v1 and equal_state(model, first)
        # The next poll looks at head in full and stages v2 against v1.
        assert until(agent, lambda: agent.pending_version == v2)
        assert agent.apply_pending() == v2
        assert equal_state(model, bump(Ten().state_dict(), 0.02))


def test_a_group_apply_is_refused_in_auto_mode_and_with_probations(
    settings: HotswapSettings,
) -> None:
    model = Ten()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    late = Probation(lambda m: None, seconds=60)
    with Publisher(MODEL, settings=settings) as pub:
        v1 = pub.publish(bump(model.state_dict(), 0.01))
        with Agent(model, MODEL, settings=settings) as auto:
            with pytest.raises(
                ConfigError,
                match=r"^model 'm': a group apply needs Agent\(mode='manual'\); in auto mode",
            ):
                auto.apply_pending(group=object())
            assert auto.wait_for(v1, 10)
        restore(model, before)
        with Agent(model, MODEL, settings=settings, mode="manual", probes=[late]) as agent:
            assert until(agent, lambda: agent.pending_version == v1)
            with pytest.raises(
                ConfigError, match=r"^model 'm': a Probation reverts one rank alone; a group"
            ):
                agent.apply_pending(group=object())
            # Nothing changed: still pending, nothing applied.
            assert agent.pending_version == v1 and agent.applied_version is None
            assert equal_state(model, before)


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(state[k])


def test_a_fast_publisher_does_not_keep_a_slow_rank_from_ever_agreeing(
    settings: HotswapSettings, group_of: Any
) -> None:
    """Rank 1 validates a version in about 1.8 s; a version comes every 0.1 s, so rank 0
    alone would keep only the last 0.3 s of them: it keeps what rank 1 stages too."""
    g = group_of(2, slow=1)
    stop = threading.Event()
    published: list[int] = []

    def publish() -> None:
        with Publisher("m", settings=settings) as pub:
            for seed in range(1, 200):
                published.append(pub.publish(full(seed)))
                if stop.wait(0.1):
                    return

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert poll(lambda: len(published) > 0, 500)
        steps = 0
        applied: list[Any] = [None]
        while applied[0] is None and steps < 3000:
            replies = g.all("step")
            applied = [r["applied"] for r in replies]
            assert len(set(applied)) == 1 and len({r["version"] for r in replies}) == 1
            assert all(len(r["pending"]) <= KEEP_PENDING + 2 for r in replies)
            steps += 1
        assert applied[0] is not None, "no version agreed on while the publisher ran"
        assert publisher.is_alive()  # agreed while versions kept coming
        assert all(close_to(r["out"], full(published.index(applied[0]) + 1)) for r in replies)
    finally:
        stop.set()
        publisher.join(30)
