"""Canary rollouts with serving processes of their own on a real Redis (issue 17).

Each test starts a few ``rollout_worker.py`` processes (agents with fixed names,
some on the canary track), publishes v1 to all, publishes v2 with
``promote=False`` and runs ``hotswap rollout`` as a process of its own. The
workers record every version they ran with ``time.time()``; the rollout record
keeps Redis's ``TIME``: one host, one clock, so "after" can be checked and the
time from the rollout's decision to each canary's revert is measured (printed
and appended to ``REVERT_LOG``; it is a figure to report, not an assertion).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rollout_support import (
    MODEL,
    Pool,
    Worker,
    digests,
    hotswap_rollout,
    started_rollout,
    state,
    times,
    versions,
)
from waiting import poll

from hotswap.embedded import EmbeddedRedis
from hotswap.pins import PinIO
from hotswap.rollouts import Record, RolloutIO
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

pytestmark = pytest.mark.timeout(120)

REVERT_LOG = Path("/tmp/hotswap-rollout-revert-times.txt")

Fleet = Callable[..., list[Worker]]


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """Worker processes kept idle between tests: a start imports torch, seconds each."""
    workers = Pool(4)
    yield workers
    workers.close()


@pytest.fixture
def fleet(pool: Pool, server: EmbeddedRedis, client: redis.Redis) -> Iterator[Fleet]:
    """Serving agents side by side: ``fleet(("c1", "canary"), ("s1", "stable"), ...)``;
    the one named ``probe=`` has the probe."""

    def build(
        *specs: tuple[str, str], heartbeat_ttl: float = 10.0, probe: str = ""
    ) -> list[Worker]:
        return pool.serve(server.url, *specs, heartbeat_ttl=heartbeat_ttl, probe=probe)

    yield build
    pool.give_back()


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    with Publisher(MODEL, settings=settings) as p:
        yield p


@pytest.fixture
def env(server: EmbeddedRedis) -> dict[str, str]:
    return {"HOTSWAP_REDIS_URL": server.url}


def v1_everywhere(pub: Publisher, workers: list[Worker]) -> int:
    v1 = pub.publish(state(1))
    for w in workers:
        assert w.until(v1)["digests"] == digests(state(1))
    return v1


def record_of(store: Store) -> Record:
    record = RolloutIO(store).read()
    assert record is not None
    return record


def revert_seconds(history: list[dict[str, Any]], bad: int, back: int, ended: float) -> float:
    """From the rollout's decision (its record's ``ended``, Redis's clock) to the worker
    running ``back`` again after ``bad`` (the worker's watcher, the same host's clock)."""
    left = max(times(history, "running", bad))
    (again,) = [e["at"] for e in history if e["event"] == "running" and e["at"] > left]
    assert [e["version"] for e in history if e["event"] == "running" and e["at"] > left] == [back]
    return float(again - ended)


def note(what: str, seconds: float) -> None:
    line = f"{what}: {seconds * 1000:.1f} ms from the rollout's decision to the revert"
    print(line)
    with REVERT_LOG.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def test_a_canary_is_promoted_through_every_step(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str]
) -> None:
    workers = fleet(("c1", "canary"), ("s1", "stable"), ("s2", "stable"), ("s3", "stable"))
    v1 = v1_everywhere(pub, workers)
    v2 = pub.publish(state(2), promote=False)
    # A user error first: no such version; nothing is written.
    wrong = hotswap_rollout(env, "9", "--canary", "1")
    assert wrong.returncode == 1, wrong.stderr
    assert "has no v9" in wrong.stderr
    assert RolloutIO(store).read() is None and store.head() == v1
    done = hotswap_rollout(
        env, str(v2), "--canary", "1", "--steps", "50%", "--bake", "0.5s", "--apply-timeout", "20s"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 1 of 3 (1)" in done.stdout and "step 2 of 3 (50%)" in done.stdout
    assert f"model {MODEL}: v{v2} promoted" in done.stdout
    assert store.head() == v2 and PinIO(store).all() == {}
    record = record_of(store)
    assert record.state == "promoted" and len(record.members) == 2
    assert record.members[0] == workers[0].agent_id  # the canary track comes first
    (promoted,) = [e for e in store.log(20) if e["kind"] == "promote"]
    at_promotion = float(promoted["created"])
    by_id = {w.agent_id: w.until(v2) for w in workers}
    for reply in by_id.values():
        assert reply["digests"] == digests(state(2)) and reply["pinned"] is None
        assert versions(reply["history"], "applied") == [v1, v2]
    canary = times(by_id[record.members[0]]["history"], "applied", v2)[0]
    second = times(by_id[record.members[1]]["history"], "applied", v2)[0]
    # The canary before the second step's agent, both before promotion; the rest after.
    assert canary < second < at_promotion
    for agent_id, reply in by_id.items():
        if agent_id not in record.members:
            assert times(reply["history"], "applied", v2)[0] > at_promotion


def _bad_version(pub: Publisher, case: str) -> int:
    if case == "rejection":
        bad = state(2)
        bad["w"][3, 3] = float("nan")  # validation refuses it before it runs anywhere
        return pub.publish(bad, promote=False)
    return pub.publish(state(2, probe_bad=case == "probe"), promote=False)


@pytest.mark.parametrize("case", ["rejection", "probe", "health"])
def test_a_canary_is_rolled_back_and_nobody_else_ran_the_version(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str], case: str
) -> None:
    """c1 has the failure (a failed probe, or an error rate the test sets once it runs
    v2); c2, the other canary, ran v2 and goes back on v1. A validation refusal (NaN)
    happens on both canaries, so the reason names either."""
    workers = fleet(
        ("c1", "canary"), ("c2", "canary"), ("s1", "stable"), ("s2", "stable"), probe="c1"
    )
    c1, c2, *others = workers
    v1 = v1_everywhere(pub, workers)
    v2 = _bad_version(pub, case)
    limits = ["--max", "error_rate=0.1"]
    rollout = started_rollout(
        env, str(v2), "--canary", "2", "--bake", "60s", "--apply-timeout", "30s", *limits
    )
    try:
        if case == "health":
            c1.until(v2)
            c2.until(v2)
            c1("health", values={"error_rate": 0.25})
        out, err = rollout.communicate(timeout=60)
    finally:
        if rollout.poll() is None:
            rollout.kill()
            rollout.wait(10)
    assert rollout.returncode == 4, out + err
    named = c2 if f"canary {c2.agent_id} refused" in out else c1
    reason = {
        "rejection": f"canary {named.agent_id} refused v{v2}",
        "probe": f"canary {c1.agent_id} refused v{v2}",
        "health": f"canary {c1.agent_id} reports error_rate=0.25, outside error_rate <= 0.1",
    }[case]
    assert f"v{v2} rolled back: " in out and reason in out, out
    if case == "probe":
        assert "mark[1] reached 9.5" in out
    if case == "rejection":
        assert "not finite" in out.lower() or "nan" in out.lower(), out
    record = record_of(store)
    assert record.state == "rolled_back" and record.ended is not None
    assert store.head() == v1 and PinIO(store).all() == {}
    for w in (c1, c2):
        reply = w.until(v1)
        assert reply["digests"] == digests(state(1)) and reply["pinned"] is None
    for w in others:
        reply = w("state")
        # Never applied, never fetched to a refusal: v2 is nowhere in their history.
        assert v2 not in versions(reply["history"]), reply["history"]
        assert reply["applied"] == v1 and reply["digests"] == digests(state(1))
    c2_history = c2("state")["history"]
    if case == "rejection":
        assert v2 not in versions(c2_history, "running")
        assert v2 in versions(c2_history, "rejected")
    else:
        # c2 ran v2 and was taken back by the rollout, from host memory.
        assert versions(c2_history, "applied") == [v1, v2]
        took = revert_seconds(c2_history, v2, v1, record.ended)
        assert took > 0  # the revert followed the decision
        ran = max(times(c2_history, "applied", v2)) - record.ended
        note(f"{case}: healthy canary c2 (it applied v2 {ran * 1000:+.0f} ms from it)", took)
    c1_history = c1("state")["history"]
    if case == "health":
        took = revert_seconds(c1_history, v2, v1, record.ended)
        assert took > 0
        note("health: the canary that reported the error rate (c1)", took)
    else:
        # Refused on c1: by validation (never ran) or by its probe (reverted at once).
        assert v2 in versions(c1_history, "rejected")
        assert v2 not in versions(c1_history, "applied")


def test_a_sick_version_is_reverted_on_every_canary(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str]
) -> None:
    """A version that passes validation and probes but raises every canary's error rate:
    each canary reverts after the decision (the issue's 1 s target, measured here)."""
    workers = fleet(("c1", "canary"), ("c2", "canary"), ("s1", "stable"), ("s2", "stable"))
    v1 = v1_everywhere(pub, workers)
    v2 = pub.publish(state(2, sick=True), promote=False)
    done = hotswap_rollout(
        env, str(v2), "--canary", "2", "--bake", "60s", "--max", "error_rate=0.1"
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "reports error_rate=0.5, outside error_rate <= 0.1" in done.stdout
    assert "2 of 2 canaries back on v1" in done.stdout
    record = record_of(store)
    assert record.ended is not None and store.head() == v1
    for w in workers[:2]:
        history = w.until(v1)["history"]
        took = revert_seconds(history, v2, v1, record.ended)
        assert took > 0
        note(f"sick version: canary {w.name}", took)
    for w in workers[2:]:
        assert v2 not in versions(w("state")["history"])


def test_a_killed_rollout_leaves_its_canaries_pinned_and_a_rerun_resumes(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str]
) -> None:
    workers = fleet(("c1", "canary"), ("s1", "stable"), ("s2", "stable"), ("s3", "stable"))
    c1, *others = workers
    v1 = v1_everywhere(pub, workers)
    v2 = pub.publish(state(2), promote=False)
    args = (str(v2), "--canary", "1", "--bake", "6s", "--apply-timeout", "20s")
    first = started_rollout(env, *args, "--lease", "5s")
    try:
        assert poll(
            lambda: (r := RolloutIO(store).read()) is not None and r.baking_since is not None,
            attempts=1000,
        )
    finally:
        first.kill()  # kill -9 mid-bake
        first.communicate(timeout=10)
    killed_at = time.time()
    assert first.returncode == -9
    # Defined state: the record says running, the canary stays on the pinned v2.
    assert record_of(store).state == "running"
    reply = c1("state")
    assert reply["applied"] == v2 and reply["pinned"] == v2
    busy = hotswap_rollout(env, *args)
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert "a rollout is driven by" in busy.stderr
    assert poll(lambda: RolloutIO(store).lease() is None, attempts=500), "the lease never expired"
    resumed = hotswap_rollout(env, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming the rollout of v{v2} at step 1 of 2" in resumed.stdout
    assert store.head() == v2
    history = c1.until(v2)["history"]
    # The canary never left v2 while nobody drove the rollout.
    assert versions(history, "running") == [v1, v2]
    (promoted,) = [e for e in store.log(20) if e["kind"] == "promote"]
    for w in others:
        reply = w.until(v2)
        assert versions(reply["history"], "applied") == [v1, v2]
        assert times(reply["history"], "applied", v2)[0] > float(promoted["created"]) > killed_at


def test_a_newer_publish_supersedes_the_rollout(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str]
) -> None:
    workers = fleet(("c1", "canary"), ("s1", "stable"), ("s2", "stable"), ("s3", "stable"))
    c1, *others = workers
    v1 = v1_everywhere(pub, workers)
    v2 = pub.publish(state(2), promote=False)
    rollout = started_rollout(env, str(v2), "--canary", "1", "--bake", "60s")
    try:
        c1.until(v2)
        v3 = pub.publish(state(3))
        out, err = rollout.communicate(timeout=30)
    finally:
        if rollout.poll() is None:
            rollout.kill()
            rollout.wait(10)
    assert rollout.returncode == 4, out + err
    assert f"v{v2} superseded: head moved from v{v1} to v{v3}" in out
    assert record_of(store).state == "superseded" and PinIO(store).all() == {}
    assert versions(c1.until(v3)["history"], "applied") == [v1, v2, v3]
    for w in others:
        reply = w.until(v3)
        assert versions(reply["history"], "applied") == [v1, v3]
        assert reply["digests"] == digests(state(3))


def test_a_crashed_canary_rolls_the_rollout_back_once_its_heartbeat_expires(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str]
) -> None:
    (c1,) = fleet(("c1", "canary"), heartbeat_ttl=2.0)
    others = fleet(("s1", "stable"), ("s2", "stable"), ("s3", "stable"))
    v1 = v1_everywhere(pub, [c1, *others])
    v2 = pub.publish(state(2), promote=False)
    rollout = started_rollout(env, str(v2), "--canary", "1", "--bake", "60s")
    try:
        c1.until(v2)
        c1.kill()
        killed_at = time.time()
        out, err = rollout.communicate(timeout=30)
    finally:
        if rollout.poll() is None:
            rollout.kill()
            rollout.wait(10)
    assert rollout.returncode == 4, out + err
    assert f"canary {c1.agent_id} is gone (no heartbeat, stopped or unreadable)" in out
    record = record_of(store)
    assert record.state == "rolled_back" and record.ended is not None
    assert record.ended > killed_at
    print(f"crashed canary: rolled back {record.ended - killed_at:.2f}s after kill -9 (ttl 2s)")
    assert store.head() == v1 and PinIO(store).all() == {}
    for w in others:
        reply = w("state")
        assert v2 not in versions(reply["history"]) and reply["applied"] == v1


def test_a_canary_restarted_within_its_ttl_is_still_a_canary(
    fleet: Fleet, pub: Publisher, store: Store, env: dict[str, str], server: EmbeddedRedis
) -> None:
    (c1,) = fleet(("c1", "canary"), heartbeat_ttl=10.0)
    others = fleet(("s1", "stable"), ("s2", "stable"))
    v1_everywhere(pub, [c1, *others])
    v2 = pub.publish(state(2), promote=False)
    rollout = started_rollout(env, str(v2), "--canary", "1", "--bake", "8s")
    try:
        c1.until(v2)
        c1.kill()
        # Another process (an idle one of the pool) starts an agent of the same name.
        (again,) = fleet(("c1", "canary"), heartbeat_ttl=10.0)
        assert again.proc.pid != c1.proc.pid
        assert again.agent_id == c1.agent_id
        reply = again.until(v2)
        # It applied the pinned version on start, not head.
        assert versions(reply["history"], "applied")[0] == v2 and reply["pinned"] == v2
        out, err = rollout.communicate(timeout=60)
    finally:
        if rollout.poll() is None:
            rollout.kill()
            rollout.wait(10)
    assert rollout.returncode == 0, out + err
    assert store.head() == v2
    for w in [again, *others]:
        assert w.until(v2)["digests"] == digests(state(2))
