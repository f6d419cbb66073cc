"""The reporter thread: when the status record reaches Redis.

The reporter reads a clock the tests move by hand, so that "within the
settling time" and "after it" are facts the test sets, not races it hopes to
win: while the clock stands still, only an outcome (an applied version) or
``close()`` can make the thread write.
"""

from __future__ import annotations

import logging
import threading

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


class HandClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settle(clock: HandClock, store: CountingStore, attempts: int = 40) -> bool:
    """Move the clock one settling time at a time until a record lands; whether one did.

    The thread may not have started its wait when the clock first moves (it
    then waits from the moved time), hence more than one step; the heartbeat
    is many steps away, so no step writes a record of its own.
    """
    for _ in range(attempts):
        clock.now += SETTLE_SECONDS
        if store.landed.wait(SETTLE_SECONDS):
            store.landed.clear()
            return True
    return False


def stored_state(client: redis.Redis, agent_id: str) -> str:
    raw = client.get(keys.agent_status_key("hotswap", "m", agent_id))
    assert raw is not None
    return status.decode(raw).state


def test_states_of_a_short_update_are_written_once_as_the_last(client: redis.Redis) -> None:
    store = CountingStore(client)
    clock = HandClock()
    reporter = Reporter(store, "a-1", ttl=30.0, clock=clock)
    reporter.start()
    try:
        assert settle(clock, store)  # the first record, "starting"
        assert store.written == ["starting"]
        reporter.update(state="fetching")
        reporter.update(state="applying")
        reporter.update(state="idle", version=3)
        assert store.written == ["starting"]  # the clock stands still: no write mid-update
        assert settle(clock, store)
        assert store.written == ["starting", "idle"]
        assert stored_state(client, "a-1") == "idle"
    finally:
        reporter.close(1.0)
    assert store.written[-1] == "idle"  # close() writes the record a last time


def test_close_writes_a_change_still_settling(client: redis.Redis) -> None:
    store = CountingStore(client)
    clock = HandClock()
    reporter = Reporter(store, "a-2", ttl=30.0, clock=clock)
    reporter.start()
    assert settle(clock, store)
    reporter.update(state="stopped")  # settles forever: the clock stands still
    assert reporter.close(1.0) is True
    assert stored_state(client, "a-2") == "stopped"


def test_an_applied_version_is_written_at_once(client: redis.Redis) -> None:
    store = CountingStore(client)
    clock = HandClock()
    reporter = Reporter(store, "a-3", ttl=30.0, clock=clock)
    reporter.start()
    try:
        assert settle(clock, store)
        reporter.update(state="fetching")
        reporter.applied(ApplyReport(7, "ab" * 16, 1, 100, 0.01, 0.0, 0.001), logging.getLogger())
        # The clock stands still, so the settling time never ends: only the
        # applied version itself can have made the thread write.
        assert store.landed.wait(10)
        assert store.written == ["starting", "idle"]
        raw = client.get(keys.agent_status_key("hotswap", "m", "a-3"))
        assert raw is not None and status.decode(raw).version == 7
    finally:
        reporter.close(1.0)
