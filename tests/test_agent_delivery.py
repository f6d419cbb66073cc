"""Delivery under faults: lost notices, Redis killed mid-fetch, Redis back empty.

No test sleeps: each waits for what it needs (a call the agent makes to
Redis, noted by a ``Watch``; a step of the agent's thread, ``until``) and
counts attempts where retries matter.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from agent_support import (
    MODEL,
    Ten,
    bump,
    cloned,
    commit_raw,
    equal_state,
    pointers,
    recorded_agent,
    snapshot,
    status_of,
    until,
    watched_agent,
)
from waiting import poll

from hotswap import keys, notice
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.manifest import TensorEntry
from hotswap.pacing import LOOK_GAP
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private server this test may kill; AOF fsynced on every write survives kill -9."""
    with EmbeddedRedis(persist=True, extra_args=["--appendfsync", "always"]) as server:
        yield server


def on(server: EmbeddedRedis, settings: HotswapSettings, **changes: Any) -> HotswapSettings:
    return settings.model_copy(update={"redis_url": server.url, **changes})


def store_for(server: EmbeddedRedis) -> Store:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    return Store(client, MODEL, retrying=operation_retry(5, 0.2))


class HandClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_missed_notice_is_caught_within_one_poll_interval(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    clock = HandClock()
    slow = settings.model_copy(update={"poll_interval": 1.0})
    agent, seen = watched_agent(model, slow, clock=clock)
    with agent:
        # The first look (no head yet) ends before v1 exists: v1 then comes by its
        # notice alone, and no look at head is owed when the count is taken.
        assert until(agent, lambda: agent.head_seen and agent.state == "idle")
        v1 = commit_raw(store, bump(model.state_dict(), 0.01))  # told: connected and listening
        assert agent.wait_for(v1, 10)
        heads = seen.count("head")
        new = bump(model.state_dict(), 0.02)
        v2 = commit_raw(store, new, notify=False)  # head moves, nobody is told
        clock.now += slow.poll_interval  # one poll interval passes
        assert agent.wait_for(v2, 10)
        assert seen.count("head") == heads + 1  # the first poll after the move caught it
        assert equal_state(model, new)


def test_notice_lost_with_the_subscription_connection(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    agent, _seen = watched_agent(model, settings)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        assert client.client_kill_filter(_type="pubsub") >= 1
        new = bump(model.state_dict())
        v = commit_raw(store, new)  # its notice goes nowhere: nobody is subscribed
        assert agent.wait_for(v, settings.poll_interval + 2)
        assert equal_state(model, new)


def test_garbled_notice_only_makes_the_agent_look(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    agent, _seen = watched_agent(model, settings)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        client.publish(keys.events_channel("hotswap", MODEL), b"\xc1 not msgpack")
        new = bump(model.state_dict())
        assert agent.wait_for(commit_raw(store, new), 10)
        assert equal_state(model, new) and agent.state == "idle"


def test_redis_killed_during_fetch_then_restarted(
    own_redis: EmbeddedRedis, settings: HotswapSettings
) -> None:
    cfg = on(own_redis, settings)
    model = Ten(width=64)
    where = pointers(model)
    pub = Publisher(MODEL, settings=cfg)
    v1 = pub.publish(cloned(model))
    agent, seen = watched_agent(model, cfg)
    reads: list[str] = []

    def die_on_the_third(entry: TensorEntry) -> None:
        reads.append(entry.name)
        if len(reads) == 3:  # two tensors staged, the third never arrives
            own_redis.kill()

    seen.before_read = die_on_the_third
    with agent:
        assert agent.wait_for(v1, 10)
        before = snapshot(model)
        new = bump(model.state_dict())
        v2 = pub.publish(new)
        assert until(agent, lambda: agent.state == "disconnected")
        assert snapshot(model) == before and agent.applied_version == v1
        attempts = seen.pings
        assert seen.wait(lambda: seen.pings >= attempts + 3)  # reconnects to a dead server
        assert snapshot(model) == before
        own_redis.start()  # same port, data from the append-only file
        assert agent.wait_for(v2, 15)
        assert equal_state(model, new) and pointers(model) == where
        assert status_of(store_for(own_redis), agent, lambda s: s.version == v2).version == v2
    pub.close()
    assert len(reads) > 10  # the whole version was fetched again after the restart


def test_redis_back_empty_keeps_serving_then_follows_the_new_lineage(
    settings: HotswapSettings,
) -> None:
    with EmbeddedRedis() as server:  # no persistence: a restart loses everything
        cfg = on(server, settings)
        model = Ten()
        where = pointers(model)
        pub = Publisher(MODEL, settings=cfg)
        agent, _seen = watched_agent(model, cfg)
        with agent:
            pub.publish(bump(model.state_dict(), 0.01))
            served = bump(model.state_dict(), 0.02)
            v2 = pub.publish(served)
            assert agent.wait_for(v2, 10)
            old_lineage = status_of(store_for(server), agent, lambda s: s.version == v2).lineage
            server.restart()
            assert until(
                agent, lambda: "has no head in Redis" in (agent.reporter.status.last_error or "")
            )
            assert equal_state(model, served) and agent.applied_version == v2
            # The first publish into the empty Redis is v1 of a new lineage:
            # smaller than what runs, applied all the same, by digest.
            fresh = bump(served, 0.5)
            v1 = pub.publish(fresh)
            assert v1 == 1
            assert until(agent, lambda: agent.applied_version == 1)
            assert equal_state(model, fresh) and pointers(model) == where
            s = status_of(store_for(server), agent, lambda s: (s.version, s.state) == (1, "idle"))
            assert (s.version, s.state) == (1, "idle") and s.lineage != old_lineage
            fetched = agent.reporter.status.bytes_fetched
            # Lost again, then the same bytes republished: same number, new
            # lineage: recorded as running, nothing fetched, nothing copied.
            server.restart()
            assert until(agent, lambda: agent.head_version is None)
            assert pub.publish(fresh) == 1
            assert until(
                agent, lambda: (agent.reporter.status.lineage or "") not in ("", s.lineage)
            )
            assert agent.reporter.status.bytes_fetched == fetched
            assert equal_state(model, fresh)
        pub.close()


def test_agent_started_while_redis_is_down_logs_once_and_catches_up(
    own_redis: EmbeddedRedis, settings: HotswapSettings, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = on(own_redis, settings)
    own_redis.kill()
    model = Ten()
    caplog.set_level(logging.INFO, logger="hotswap.agent")
    agent, seen = watched_agent(model, cfg)
    with agent:
        assert until(agent, lambda: agent.state == "disconnected")
        assert seen.wait(lambda: seen.pings >= 3)  # several attempts, all failed
        assert model.training  # the serving process is untouched
        own_redis.start()
        new = bump(model.state_dict())
        pub = Publisher(MODEL, settings=cfg)
        v = pub.publish(new)
        assert agent.wait_for(v, 10)
        pub.close()
    lost = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "connected to Redis again" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert len(back) == 1
    assert "still serving nothing yet, reconnecting with backoff" in lost[0].getMessage()


def test_heartbeat_is_refreshed_and_expires_after_stop(
    settings: HotswapSettings, store: Store
) -> None:
    beat = settings.model_copy(update={"heartbeat_ttl": 0.9})
    agent, seen = watched_agent(Ten(), beat)
    agent.start()
    try:
        assert until(agent, lambda: agent.state == "idle")
        written = len(seen.written)
        # Seven refreshes, a third of a ttl apart: well past two ttls, so
        # only refreshes keep the record alive.
        assert seen.wait(lambda: len(seen.written) >= written + 7)
        assert [alive for i, _, alive in store.agent_records() if i == agent.agent_id] == [True]
    finally:
        agent.stop()
    assert status_of(store, agent).state == "stopped"

    def expired() -> bool:
        return [a for i, _, a in store.agent_records() if i == agent.agent_id] == [False]

    assert poll(expired)  # Redis expires the heartbeat: nothing here announces it


def test_stop_returns_promptly_during_an_outage(
    own_redis: EmbeddedRedis, settings: HotswapSettings
) -> None:
    cfg = on(own_redis, settings)
    agent, _seen = watched_agent(Ten(), cfg)
    agent.start()
    assert until(agent, lambda: agent.state == "idle")
    own_redis.kill()
    assert until(agent, lambda: agent.state == "disconnected")
    done = threading.Event()

    def stop() -> None:
        agent.stop()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    assert done.wait(10)
    assert agent._thread is not None and not agent._thread.is_alive()
    assert agent.state == "stopped"


def test_unexpected_error_is_logged_once_and_retried(
    settings: HotswapSettings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    model = Ten()
    agent, seen = watched_agent(model, settings)
    broken = threading.Event()
    broken.set()

    def flaky(entry: TensorEntry) -> None:
        if broken.is_set():
            raise RuntimeError("out of staging memory")

    seen.before_read = flaky
    caplog.set_level(logging.INFO, logger="hotswap.agent")
    before = snapshot(model)
    with agent:
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        assert until(agent, lambda: agent.state == "disconnected")
        assert seen.wait(lambda: seen.count("read") >= 3)  # three tries, with backoff
        assert snapshot(model) == before and agent.applied_version is None
        broken.clear()
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)
    errors = [r for r in caplog.records if "unexpected RuntimeError" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage() == (
        "model 'm': unexpected RuntimeError while updating; still serving nothing yet, "
        "retrying with backoff"
    )


# -- notices, status writes, stop -----------------------------------------------------


def test_notice_reads_the_manifest_it_names_and_nothing_before(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(settings)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        seen.calls.clear()
        new = bump(model.state_dict())
        v = commit_raw(store, new)  # its notice carries no manifest
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)
        # One read of the announced manifest, then straight to the blobs.
        assert seen.calls[0] == ("manifest", v)
        assert ("head", None) not in seen.calls
        assert {c for c in seen.calls[1:]} == {("read", v)}
        # No status write on the agent's own thread: the reporter's thread writes.
        assert status_of(store, agent, lambda s: s.version == v).version == v
        assert seen.status_threads and not any(
            name.startswith("hotswap-agent") for name in seen.status_threads
        )


def test_notice_naming_a_missing_version_falls_back_to_head(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(settings)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        new = bump(model.state_dict())
        v = commit_raw(store, new, notify=False)  # head moved, nobody told
        seen.calls.clear()
        forged = notice.Notice(MODEL, v + 5, "publish", "x" * 32)
        client.publish(keys.events_channel("hotswap", MODEL), notice.encode(forged))
        assert agent.wait_for(v, 10)
        assert seen.calls[:3] == [("manifest", v + 5), ("head", None), ("manifest", v)]
        assert equal_state(model, new)


def test_forged_notice_of_an_old_version_changes_nothing(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(settings)
    with agent:
        v1 = commit_raw(store, bump(model.state_dict(), 0.01))
        assert agent.wait_for(v1, 10)
        current = bump(model.state_dict(), 0.01)
        v2 = commit_raw(store, current)
        assert agent.wait_for(v2, 10)
        before, fetched = snapshot(model), agent.reporter.status.bytes_fetched
        seen.calls.clear()
        # Another lineage in the notice makes the agent look; the manifest says v1.
        forged = notice.Notice(MODEL, v1, "publish", "x" * 32)
        client.publish(keys.events_channel("hotswap", MODEL), notice.encode(forged))
        assert seen.wait(lambda: ("manifest", v1) in seen.calls)
        assert until(agent, lambda: agent.state == "idle")
        assert ("read", v1) not in seen.calls
        assert snapshot(model) == before and agent.applied_version == v2
        assert agent.reporter.status.bytes_fetched == fetched


def test_notices_queued_during_a_fetch_go_straight_to_the_newest(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    slow = settings.model_copy(update={"poll_interval": 30.0})
    applied: list[int] = []
    agent, seen = watched_agent(model, slow, on_applied=lambda v, r: applied.append(v))
    held, release = threading.Event(), threading.Event()

    def hold(entry: TensorEntry) -> None:
        if not release.is_set():
            held.set()
            assert release.wait(10)

    seen.before_read = hold
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.events_channel("hotswap", MODEL))
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        v1 = commit_raw(store, bump(model.state_dict(), 0.01))
        assert held.wait(10)  # the agent is fetching v1
        v2 = commit_raw(store, bump(model.state_dict(), 0.02))
        newest = bump(model.state_dict(), 0.03)
        v3 = commit_raw(store, newest)
        assert _heard(listener, 3) == [v1, v2, v3]  # all three sent
        release.set()
        assert agent.wait_for(v3, 10)
        assert applied == [v1, v3] and v2 == v1 + 1
        assert equal_state(model, newest)
    listener.close()


def _heard(listener: Any, count: int, attempts: int = 100) -> list[int]:
    """The versions of the first ``count`` notices a listener hears (blocking reads)."""
    heard: list[int] = []
    for _ in range(attempts):
        message = listener.get_message(timeout=0.1)
        if message is not None:
            heard.append(notice.decode(message["data"]).version)
            if len(heard) == count:
                break
    return heard


def test_heartbeat_lives_through_one_long_tensor_fetch(
    settings: HotswapSettings, store: Store
) -> None:
    beat = settings.model_copy(update={"heartbeat_ttl": 1.5})  # refreshed every 0.5 s
    model = Ten()
    agent, seen = watched_agent(model, beat)
    held, release = threading.Event(), threading.Event()

    def hold(entry: TensorEntry) -> None:
        held.set()
        assert release.wait(20)  # one tensor that takes far longer than the ttl

    seen.before_read = hold

    def alive() -> list[bool]:
        return [a for i, _, a in store.agent_records() if i == agent.agent_id]

    with agent:
        assert until(agent, lambda: agent.state == "idle")
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        assert held.wait(10)
        assert status_of(store, agent, lambda s: s.state == "fetching").state == "fetching"
        for _ in range(9):  # nine refreshes, three ttls, inside one read
            written = len(seen.written)
            assert seen.wait(lambda: len(seen.written) > written)
            assert alive() == [True]
        release.set()
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_stop_is_bounded_with_the_default_retry_budget(
    own_redis: EmbeddedRedis, settings: HotswapSettings, fault: str
) -> None:
    # Defaults: 6 attempts with backoff up to 2 s, 10 s socket timeout: either
    # outlasts the time stop() is given below, unless stop() cuts it short.
    cfg = HotswapSettings(redis_url=own_redis.url, poll_interval=0.2, _env_file=None)  # type: ignore[call-arg]
    assert (cfg.retry_attempts, cfg.retry_max_wait, cfg.socket_timeout) == (6, 2.0, 10.0)
    agent, seen = watched_agent(Ten(), cfg)
    agent.start()
    try:
        assert until(agent, lambda: agent.state == "idle")
        if fault == "killed":
            own_redis.kill()
            assert until(agent, lambda: agent.state == "disconnected")
        else:
            own_redis.freeze()
            heads = seen.count("head")
            # The next poll's read of head is under way: it blocks on the frozen server.
            # If the freeze caught the thread inside another call (a status write), that
            # call first spends the 10 s socket timeout: wait past it.
            assert seen.wait(lambda: seen.count("head") > heads, timeout=30), seen.calls
        # A second of grace for the thread, then its sockets are closed.
        agent.stop(timeout=2.0)
        assert agent.state == "stopped"
        assert agent._thread is not None and not agent._thread.is_alive()
    finally:
        own_redis.thaw()


# -- a notice flood (issue 13, defect 5) ----------------------------------------------


@pytest.fixture
def flood(server: EmbeddedRedis) -> Iterator[subprocess.Popen[str]]:
    """Garbage notices on the model's channel from another process, as fast as one client
    sends them, until 3 million were sent or the test ends; started once it is flowing."""
    script = Path(__file__).parent / "flooder.py"
    channel = keys.events_channel("hotswap", MODEL)
    proc = subprocess.Popen(
        [sys.executable, str(script), server.url, channel, "3000000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "FLOODING"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_notice_flood_delays_no_update_and_costs_a_bounded_number_of_reads(
    settings: HotswapSettings, store: Store, flood: subprocess.Popen[str]
) -> None:
    model = Ten()
    clock = HandClock()
    slow = settings.model_copy(update={"poll_interval": 30.0})
    agent, seen = watched_agent(model, slow, clock=clock)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        # Heard at once, or else read from head when the agent's clock says so.
        if not agent.wait_for(v, 0.5):
            heads = seen.count("head")
            clock.now += LOOK_GAP
            assert seen.wait(lambda: seen.count("head") > heads), "head unread under the flood"
            assert agent.wait_for(v, 10)
        flooding = flood.poll() is None
    assert flooding, "applied only once the flood was over"
    assert equal_state(model, new)
    # Connected, one full look for the garbage, one poll: the agent's clock moved once.
    assert seen.count("head") <= 4 and seen.count("manifest") <= 2, seen.calls


# -- a refused head is read once (issue 13, defect 6) -----------------------------------


def test_a_refused_head_is_not_read_again_until_it_changes(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    before = snapshot(model)
    slow = settings.model_copy(update={"poll_interval": 30.0})
    # A forged head of a few MiB (the one of the report had 60): garbage, not msgpack.
    forged = b"\xc1" + bytes(4 * 1024 * 1024)
    client.set(keys.manifest_key("hotswap", MODEL, 1), forged)
    client.set(keys.head_key("hotswap", MODEL), 1)
    agent, seen = watched_agent(model, slow)
    channel = keys.events_channel("hotswap", MODEL)
    with agent:
        assert until(agent, lambda: agent.last_rejection is not None)
        assert seen.count("manifest") == 1
        # Garbled notices and notices naming the refused version: each round
        # makes the agent look at head again, none reads the manifest again.
        lie = notice.encode(notice.Notice(MODEL, 1, "publish", "x" * 32))
        for _ in range(6):
            heads = seen.count("head")
            client.publish(channel, b"\xc1")
            client.publish(channel, lie)
            assert seen.wait(lambda: seen.count("head") > heads), seen.calls
        assert seen.count("manifest") == 1, seen.calls
        # Written again (same version, other bytes): read again, and refused again.
        client.set(keys.manifest_key("hotswap", MODEL, 1), forged + b"\x00")
        client.publish(channel, b"\xc1")
        assert seen.wait(lambda: seen.count("manifest") == 2)
        assert until(agent, lambda: agent.state == "idle")
        assert snapshot(model) == before and agent.applied_version is None
        # Head moves on (to a version the forged one is not the parent of): applied.
        client.delete(keys.head_key("hotswap", MODEL))
        client.set(keys.seq_key("hotswap", MODEL), 1)
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)
