"""The reporter thread: when the status record reaches Redis."""

from __future__ import annotations

import logging
import threading
import time

import redis

from hotswap import keys, status
from hotswap.reporter import SETTLE_SECONDS, ApplyReport, Reporter
from hotswap.store import Store


class CountingStore(Store):
    """A Store that also remembers the state of every record it wrote."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, "m")
        self.written: list[str] = []
        self.landed = threading.Event()

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        super().write_agent_status(agent_id, record, ttl)
        self.written.append(status.decode(record).state)
        self.landed.set()


def stored_state(client: redis.Redis, agent_id: str) -> str:
    raw = client.hget(keys.agents_key("hotswap", "m"), agent_id)
    assert raw is not None
    return status.decode(raw).state


def test_states_of_a_short_update_are_written_once_as_the_last(client: redis.Redis) -> None:
    store = CountingStore(client)
    reporter = Reporter(store, "a-1", ttl=30.0)
    reporter.start()
    try:
        assert store.landed.wait(5)  # the first record, "starting"
        assert store.written == ["starting"]
        reporter.update(state="fetching")
        reporter.update(state="applying")
        reporter.update(state="idle", version=3)
        time.sleep(SETTLE_SECONDS / 2)
        assert store.written == ["starting"]  # nothing written in the middle of an update
        deadline = time.monotonic() + 5
        while len(store.written) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.written == ["starting", "idle"]
        assert stored_state(client, "a-1") == "idle"
    finally:
        reporter.close(1.0)
    assert store.written[-1] == "idle"  # close() writes the record a last time


def test_close_writes_a_change_still_settling(client: redis.Redis) -> None:
    store = CountingStore(client)
    reporter = Reporter(store, "a-2", ttl=30.0)
    reporter.start()
    assert store.landed.wait(5)
    reporter.update(state="stopped")
    assert reporter.close(1.0) is True
    assert stored_state(client, "a-2") == "stopped"


def test_an_applied_version_is_written_at_once(client: redis.Redis) -> None:
    store = CountingStore(client)
    reporter = Reporter(store, "a-3", ttl=30.0)
    reporter.start()
    try:
        assert store.landed.wait(5)
        reporter.update(state="fetching")
        started = time.monotonic()
        reporter.applied(ApplyReport(7, "ab" * 16, 1, 100, 0.01, 0.0, 0.001), logging.getLogger())
        while "idle" not in store.written and time.monotonic() - started < 5:
            time.sleep(0.001)
        assert time.monotonic() - started < SETTLE_SECONDS / 2
        assert store.written == ["starting", "idle"]
        raw = client.hget(keys.agents_key("hotswap", "m"), "a-3")
        assert raw is not None and status.decode(raw).version == 7
    finally:
        reporter.close(1.0)
