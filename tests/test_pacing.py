"""What a notice flood may cost the agent: the delivery loop's pacing (issue 13, defect 5).

The pacing rules are pure and run on a hand-moved clock; the loop itself runs
against a real Redis with a handler that records what it is asked, and the
tests count notices read and requests made, never time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import redis
from waiting import poll

from hotswap import keys, notice, pacing
from hotswap.delivery import Delivery, Reason, Request
from hotswap.errors import FormatError
from hotswap.pacing import LOOK_GAP, SHED_FIRST, SHED_MAX, Due, Pacing
from hotswap.store import Store

# -- the rules, on a hand-moved clock ------------------------------------------------


def test_notices_that_name_nothing_cost_one_full_look_per_gap() -> None:
    pace = Pacing(0.0, poll_interval=30.0)
    looks = []
    for ms in range(1000):  # a garbled notice every millisecond for a second
        now = ms / 1000
        pace.hear(now, look=True, flood=False)
        if pace.due(now) is Due.LOOK:
            looks.append(now)
            pace.handled(now, forced=True, at_head=True)
    assert looks == [0.0, LOOK_GAP]
    assert pace.due(0.999) is None and pace.look_at == 2 * LOOK_GAP


def test_a_named_version_is_read_at_once_and_spends_the_full_look_it_may_fall_back_to() -> None:
    pace = Pacing(0.0, poll_interval=30.0)
    assert pace.may_force(0.0)
    pace.handled(0.0, forced=True, at_head=False)  # a named notice, read at once
    assert not pace.may_force(0.1) and pace.may_force(LOOK_GAP)
    # A look owed to a garbled notice stays owed across a named version's read.
    pace.hear(0.2, look=True, flood=False)
    pace.handled(0.2, forced=False, at_head=False)
    assert pace.due(0.2) is None and pace.due(LOOK_GAP) is Due.LOOK


def test_a_flood_stops_the_listening_and_head_is_read_every_gap_meanwhile() -> None:
    pace = Pacing(0.0, poll_interval=30.0)
    pace.hear(0.0, look=True, flood=True)
    assert not pace.listening and pace.deaf_until == SHED_FIRST
    assert pace.due(0.0) is Due.LOOK
    pace.handled(0.0, forced=True, at_head=True)
    assert pace.due(LOOK_GAP / 2) is None and pace.due(LOOK_GAP) is Due.POLL
    pace.handled(LOOK_GAP, forced=False, at_head=True)
    assert not pace.listen_again(SHED_FIRST / 2)
    assert pace.listen_again(SHED_FIRST) and pace.listening
    assert pace.due(SHED_FIRST) is Due.POLL  # notices said meanwhile went unheard


def test_floods_in_a_row_double_the_shed_up_to_its_cap_and_calm_resets_it() -> None:
    pace = Pacing(0.0, poll_interval=30.0)
    now, sheds = 0.0, []
    for _ in range(8):
        pace.hear(now, look=False, flood=True)
        sheds.append(pace.shed)
        now = pace.deaf_until or now
        assert pace.listen_again(now)
    assert sheds[:3] == [SHED_FIRST, 2 * SHED_FIRST, 4 * SHED_FIRST] and sheds[-1] == SHED_MAX
    pace.hear(now + 10 * SHED_MAX, look=False, flood=True)  # a flood after a calm spell
    assert pace.shed == SHED_FIRST


def test_a_batch_is_a_flood_when_full_by_count_or_by_bytes() -> None:
    assert not pacing.flood(pacing.NOTICE_BATCH - 1, 100)
    assert pacing.flood(pacing.NOTICE_BATCH, 100)
    assert pacing.flood(1, pacing.NOTICE_BATCH_BYTES)


# -- the loop, against a real Redis ---------------------------------------------------


class HandClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A delivery handler that notes every notice it is asked about and every request."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.wanted_calls = 0
        self.requests: list[Request] = []

    def wanted(self, raw: bytes) -> Request | None:
        with self.changed:
            self.wanted_calls += 1
            self.changed.notify_all()
        try:
            n = notice.decode(raw)
        except FormatError:
            return Request(Reason.NOTICE)
        return Request(Reason.NOTICE, n.version)

    def handle(self, request: Request) -> None:
        with self.changed:
            self.requests.append(request)
            self.changed.notify_all()

    def wait(self, check: Callable[[], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(check, 20.0)

    def count(self, reason: Reason, named: bool | None = None) -> int:
        with self.changed:
            return sum(
                1
                for r in self.requests
                if r.reason is reason and (named is None or (r.version is not None) == named)
            )


Loop = tuple[Recorder, HandClock]
CHANNEL = keys.events_channel("hotswap", "m")


@pytest.fixture
def loop(store: Store) -> Iterator[Loop]:
    """A delivery loop on a hand-moved clock, with a ``Recorder`` for its handler."""
    handler, clock = Recorder(), HandClock()
    delivery = Delivery(store, 30.0, handler, lambda e: None, clock=clock)
    thread = threading.Thread(target=delivery.run, daemon=True)
    thread.start()
    assert handler.wait(lambda: handler.count(Reason.CONNECTED) == 1)
    yield handler, clock
    delivery.stop()
    thread.join(10)


def _publish(client: redis.Redis, payloads: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.publish(CHANNEL, payload)
    pipe.execute()


def _subscribers(client: redis.Redis) -> int:
    return int(client.pubsub_numsub(CHANNEL)[0][1])


def test_a_queued_flood_is_shed_unread_and_head_is_polled_instead(
    client: redis.Redis, loop: Loop
) -> None:
    handler, clock = loop
    _publish(client, [b"\xc1"] * (20 * pacing.NOTICE_BATCH))
    # The first full batch is a flood: the loop stops listening, and the
    # notices still queued in Redis are dropped with the subscription.
    assert handler.wait(lambda: handler.count(Reason.NOTICE) == 1)  # the one look they ask for
    assert poll(lambda: _subscribers(client) == 0)
    assert handler.wanted_calls == pacing.NOTICE_BATCH
    # Not listening, the loop reads head every LOOK_GAP instead of every poll interval.
    clock.now += LOOK_GAP
    assert handler.wait(lambda: handler.count(Reason.POLL) == 1)
    clock.now += SHED_FIRST - LOOK_GAP
    assert handler.wait(lambda: handler.count(Reason.POLL) == 2)  # listening again: head at once
    assert poll(lambda: _subscribers(client) == 1)
    assert handler.wanted_calls == pacing.NOTICE_BATCH
    # A notice naming a version is acted on at once.
    _publish(client, [notice.encode(notice.Notice("m", 7, "publish", "l" * 32))])
    assert handler.wait(lambda: handler.count(Reason.NOTICE, named=True) == 1)


def test_a_trickle_of_garbage_is_read_but_costs_one_look_per_gap(
    client: redis.Redis, loop: Loop
) -> None:
    handler, clock = loop
    sent = 0
    for _ in range(20):  # a few notices at a time, each burst under a batch
        _publish(client, [b"\xc1"] * 8)
        sent += 8
        assert handler.wait(lambda: handler.wanted_calls == sent)
    # Every notice was read (none was a flood), and they cost one look at head.
    assert handler.count(Reason.NOTICE) == 1
    clock.now += LOOK_GAP
    assert handler.wait(lambda: handler.count(Reason.NOTICE) == 2)  # the one owed since
    assert not any(r.version for r in handler.requests) and handler.count(Reason.POLL) == 0


def test_named_versions_are_read_at_once_but_fall_back_to_a_full_look_once_per_gap(
    client: redis.Redis, loop: Loop
) -> None:
    handler, clock = loop
    for version in (7, 8, 9):  # each its own wake-up, none held by Redis (lies, say)
        _publish(client, [notice.encode(notice.Notice("m", version, "publish", "l" * 32))])
        assert handler.wait(lambda: handler.count(Reason.NOTICE, named=True) == version - 6)
    named = [r for r in handler.requests if r.version is not None]
    assert [(r.version, r.recheck) for r in named] == [(7, True), (8, False), (9, False)]
    clock.now += LOOK_GAP
    _publish(client, [notice.encode(notice.Notice("m", 10, "publish", "l" * 32))])
    assert handler.wait(lambda: any(r.version == 10 and r.recheck for r in handler.requests))
