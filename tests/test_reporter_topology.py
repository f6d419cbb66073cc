"""The reporter writes the record again when a cluster client learns a new slot map.

The failover itself runs on a real cluster
(tests/ha/test_sharded_notices.py::test_status_is_written_again_after_a_failover_lost_the_last_write);
here the clock is moved by hand, as in test_reporter.py, and the slot-map
event is redis-py's own, dispatched by the test.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import redis
from redis.event import AfterSlotsCacheRefreshEvent, EventDispatcher
from test_reporter import CountingStore, HandClock, settle

from hotswap import keys
from hotswap.agentrecords import AgentRecordIO
from hotswap.errors import StoreUnavailable
from hotswap.reporter import RETRY_SECONDS, SETTLE_SECONDS, Reporter


class FailingOnce(CountingStore):
    """Refuses its second write (Redis away), then writes again."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.calls = 0

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        self.calls += 1
        if self.calls == 2:
            raise StoreUnavailable("Redis unreachable while writing agent status")
        super().write_agent_status(agent_id, record, ttl)


def test_a_new_slot_map_writes_a_lost_record_again(client: redis.Redis) -> None:
    store = CountingStore(client)
    clock = HandClock()
    reporter = Reporter(store, "a-1", ttl=600.0, clock=clock)
    reporter.start()
    try:
        assert settle(clock, store)
        # The write the old master acknowledged is gone with it.
        client.delete(keys.agent_status_key("hotswap", "m", "a-1"))
        reporter.topology_changed()
        assert settle(clock, store)
        assert client.exists(keys.agent_status_key("hotswap", "m", "a-1")) == 1
        assert store.written == ["starting", "starting"]
    finally:
        reporter.close(5.0)


def test_a_new_slot_map_ends_the_pause_after_a_failed_write(client: redis.Redis) -> None:
    store = FailingOnce(client)
    clock = HandClock()
    reporter = Reporter(store, "a-1", ttl=600.0, clock=clock)
    reporter.start()
    try:
        assert settle(clock, store)
        reporter.update(state="idle")
        steps = 0
        while store.calls < 2:  # the refused write
            clock.now += SETTLE_SECONDS
            steps += 1
            store.landed.wait(SETTLE_SECONDS)
            assert steps < 40
        reporter.topology_changed()
        # Written again within fewer settling steps than the pause would take.
        pause_steps = int(RETRY_SECONDS / SETTLE_SECONDS)
        assert settle(clock, store, attempts=pause_steps - 1)
        assert store.written == ["starting", "idle"]
    finally:
        reporter.close(5.0)


def test_watching_the_topology_calls_back_until_stopped() -> None:
    dispatcher = EventDispatcher()
    cluster_like = SimpleNamespace(nodes_manager=SimpleNamespace(_event_dispatcher=dispatcher))
    heard: list[int] = []
    records = AgentRecordIO(cluster_like, "m", "hotswap", lambda what, fn: fn())
    stop = records.watch_topology(lambda: heard.append(1))
    dispatcher.dispatch(AfterSlotsCacheRefreshEvent())
    assert heard == [1]
    stop()
    dispatcher.dispatch(AfterSlotsCacheRefreshEvent())
    assert heard == [1]


def test_one_server_has_no_topology_to_watch(client: redis.Redis) -> None:
    records = AgentRecordIO(client, "m", "hotswap", lambda what, fn: fn())
    stop = records.watch_topology(lambda: None)
    stop()  # nothing was registered, nothing to undo


def test_a_watching_reporter_is_held_weakly(client: redis.Redis) -> None:
    dispatcher = EventDispatcher()
    cluster_like = SimpleNamespace(nodes_manager=SimpleNamespace(_event_dispatcher=dispatcher))
    records = AgentRecordIO(cluster_like, "m", "hotswap", lambda what, fn: fn())
    reporter = Reporter(CountingStore(client), "a-1", ttl=600.0)
    records.watch_topology(reporter.topology_changed)  # never stopped
    gone = weakref.ref(reporter)
    del reporter
    gc.collect()
    assert gone() is None
    dispatcher.dispatch(AfterSlotsCacheRefreshEvent())  # a dead listener is a no-op
