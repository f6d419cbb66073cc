"""Delivery under faults: lost notices, Redis killed mid-fetch, Redis back empty."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
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
    eventually,
    pointers,
    snapshot,
    status_of,
)

from hotswap import keys
from hotswap.agent import Agent
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
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


def test_missed_notice_is_caught_within_one_poll_interval(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    slow = settings.model_copy(update={"poll_interval": 1.0})
    with Agent(model, MODEL, settings=slow) as agent:
        assert eventually(lambda: agent.state == "idle")
        time.sleep(0.1)
        new = bump(model.state_dict())
        v = commit_raw(store, new, notify=False)  # head moves, nobody is told
        moved = time.monotonic()
        assert agent.wait_for(v, 5)
        assert time.monotonic() - moved <= 1.0 + 0.75  # one interval, plus fetch and apply
        assert equal_state(model, new)


def test_notice_lost_with_the_subscription_connection(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    with Agent(model, MODEL, settings=settings) as agent:
        assert eventually(lambda: agent.state == "idle")
        assert client.client_kill_filter(_type="pubsub") >= 1
        new = bump(model.state_dict())
        v = commit_raw(store, new)  # its notice goes nowhere: nobody is subscribed
        assert agent.wait_for(v, settings.poll_interval + 2)
        assert equal_state(model, new)


def test_garbled_notice_only_makes_the_agent_look(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model = Ten()
    with Agent(model, MODEL, settings=settings) as agent:
        assert eventually(lambda: agent.state == "idle")
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
    agent = Agent(model, MODEL, settings=cfg)
    real_read = agent.store.read_into
    reads: list[str] = []

    def read_then_die(entry: Any, out: memoryview, version: int | None = None) -> None:
        reads.append(entry.name)
        if len(reads) == 3:  # two tensors staged, the third never arrives
            own_redis.kill()
        real_read(entry, out, version)

    agent.store.read_into = read_then_die  # type: ignore[method-assign]
    with agent:
        assert agent.wait_for(v1, 10)
        before = snapshot(model)
        new = bump(model.state_dict())
        v2 = pub.publish(new)
        assert eventually(lambda: agent.state == "disconnected", 10)
        assert snapshot(model) == before and agent.applied_version == v1
        time.sleep(0.5)  # a few reconnect attempts against a dead server
        assert snapshot(model) == before
        own_redis.start()  # same port, data from the append-only file
        assert agent.wait_for(v2, 15)
        assert equal_state(model, new) and pointers(model) == where
        assert eventually(lambda: status_of(store_for(own_redis), agent).version == v2)
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
        with Agent(model, MODEL, settings=cfg) as agent:
            pub.publish(bump(model.state_dict(), 0.01))
            served = bump(model.state_dict(), 0.02)
            v2 = pub.publish(served)
            assert agent.wait_for(v2, 10)
            old_lineage = status_of(store_for(server), agent).lineage
            server.restart()
            assert eventually(
                lambda: "has no head in Redis" in (agent.reporter.status.last_error or ""), 10
            )
            assert equal_state(model, served) and agent.applied_version == v2
            # The first publish into the empty Redis is v1 of a new lineage:
            # smaller than what runs, applied all the same, by digest.
            fresh = bump(served, 0.5)
            v1 = pub.publish(fresh)
            assert v1 == 1
            assert eventually(lambda: agent.applied_version == 1, 10)
            assert equal_state(model, fresh) and pointers(model) == where
            s = status_of(store_for(server), agent)
            assert (s.version, s.state) == (1, "idle") and s.lineage != old_lineage
            fetched = agent.reporter.status.bytes_fetched
            # Lost again, then the same bytes republished: same number, new
            # lineage: recorded as running, nothing fetched, nothing copied.
            server.restart()
            assert eventually(lambda: agent.head_version is None, 10)
            assert pub.publish(fresh) == 1
            assert eventually(
                lambda: (agent.reporter.status.lineage or "") not in ("", s.lineage), 10
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
    with Agent(model, MODEL, settings=cfg) as agent:
        assert eventually(lambda: agent.state == "disconnected", 10)
        time.sleep(1.5)  # several attempts
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
    agent = Agent(Ten(), MODEL, settings=beat).start()
    try:
        assert eventually(lambda: agent.state == "idle")
        time.sleep(2.0)  # well past one ttl: only refreshes keep it alive
        assert [alive for i, _, alive in store.agent_records() if i == agent.agent_id] == [True]
    finally:
        agent.stop()
    assert status_of(store, agent).state == "stopped"
    assert eventually(
        lambda: [a for i, _, a in store.agent_records() if i == agent.agent_id] == [False], 3
    )


def test_stop_returns_promptly_during_an_outage(
    own_redis: EmbeddedRedis, settings: HotswapSettings
) -> None:
    cfg = on(own_redis, settings)
    agent = Agent(Ten(), MODEL, settings=cfg).start()
    assert eventually(lambda: agent.state == "idle")
    own_redis.kill()
    assert eventually(lambda: agent.state == "disconnected", 10)
    started = time.monotonic()
    done = threading.Event()

    def stop() -> None:
        agent.stop()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    assert done.wait(10)
    assert time.monotonic() - started < 5
    assert agent.state == "stopped"


def test_unexpected_error_is_logged_once_and_retried(
    settings: HotswapSettings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    model = Ten()
    agent = Agent(model, MODEL, settings=settings)
    real_read = agent.store.read_into
    broken = threading.Event()
    broken.set()

    def flaky(entry: Any, out: memoryview, version: int | None = None) -> None:
        if broken.is_set():
            raise RuntimeError("out of staging memory")
        real_read(entry, out, version)

    agent.store.read_into = flaky  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="hotswap.agent")
    before = snapshot(model)
    with agent:
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        assert eventually(lambda: agent.state == "disconnected", 10)
        time.sleep(1.0)  # several retries, with backoff
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
