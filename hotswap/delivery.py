"""The agent's delivery loop: subscribe, poll head, reconnect with backoff, never give up.

Shaped like redis-py's ``PubSubWorkerThread``: ``run`` is the thread's body,
``stop`` ends it, and one injected ``exception_handler`` hears every failure.
What a wake-up means (which manifest, what to apply) is the handler's business
(``hotswap.pipeline``); this module only decides *when* to ask, and
``hotswap.pacing`` bounds how often whatever arrives on the channel. Head is
read right after every (re)connect and every ``poll_interval``, because
pub/sub drops what is said while a client is away.

A subscription that fails while head can still be read (its node died in a
cluster failover, or gave the shard channel's slot to another:
``subscription.ChannelMoved``) does not end the session: the loop goes on polling and
subscribes again, once per ``RELISTEN_GAP`` at most, each try once, to
whichever node now serves the channel.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import tenacity

from hotswap import keys, pacing
from hotswap.connection import TRANSIENT, guarded, operation_retry, reconnect_backoff
from hotswap.errors import StoreUnavailable
from hotswap.pacing import Due, Pacing
from hotswap.store import Store
from hotswap.subscription import Subscription

log = logging.getLogger("hotswap.agent")
# Longest the loop waits on the channel before it looks at its timers and stop flag.
TICK = 0.2
# Longest pause between two tries to subscribe again after a subscription
# failed mid-session (a shorter poll interval shortens it).
RELISTEN_GAP = 1.0


class Stopped(Exception):
    """Raised inside the loop to abandon work once ``stop`` is set."""


class _Dropped(Exception):
    """A session that had worked lost its connection: reconnect at once."""


class Reason(enum.Enum):
    """Why the loop asks the handler to look."""

    CONNECTED = "a session began: head may have moved while nobody listened"
    NOTICE = "a notice arrived"
    POLL = "the poll interval passed"
    FOLLOW = "a rollout moved what agents follow (pins): look at it, unforced"


@dataclass(frozen=True)
class Request:
    """What to look at: head, or the version a notice announced.

    Attributes:
        reason: why the loop asks.
        version: the version a notice announced; None to read head.
        carried: the manifest bytes that notice carried for ``version``.
        recheck: False when a full look at head was spent too recently
            (``pacing.LOOK_GAP``): a named version that Redis does not hold
            then falls back to head only if head moved.
    """

    reason: Reason
    version: int | None = None
    carried: bytes | None = None
    recheck: bool = True

    @property
    def force(self) -> bool:
        """Whether to consider head even if it did not move since the last look."""
        return self.reason is not Reason.POLL and self.recheck


CONNECTED = Request(Reason.CONNECTED)
POLL = Request(Reason.POLL)
# A full look at head, which notices that name nothing to read ask for.
LOOK = Request(Reason.NOTICE)
# A look at what this agent follows, at once and unforced: one read of head and
# pins, and a manifest only if that moved (so a flood of these costs a round
# trip a wake-up, as a poll does), which a rollout's pin notice asks for.
FOLLOW = Request(Reason.FOLLOW, recheck=False)


class Handler(Protocol):
    """What the loop drives: the agent's update path."""

    def wanted(self, raw: bytes) -> Request | None:
        """The request a raw notice makes, or None when it announces nothing new."""

    def handle(self, request: Request) -> None:
        """Look, fetch, and apply or refuse; raises to end the session."""


class Delivery:
    """Runs ``handler.handle`` whenever head may have moved, across Redis outages.

    Args:
        store: the model's store (ping, subscribe).
        poll_interval: seconds between two reads of head.
        handler: turns notices into requests and handles them.
        exception_handler: hears each failure of a session, before the backoff.
        stop: set to end the loop (and abandon a fetch between two tensors).
        clock: seconds on a monotonic clock, for the poll timer.
    """

    def __init__(
        self,
        store: Store,
        poll_interval: float,
        handler: Handler,
        exception_handler: Callable[[BaseException], None],
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.handler = handler
        self.exception_handler = exception_handler
        self._stop = stop or threading.Event()
        self._clock = clock

    def stop(self) -> None:
        """Ask the loop to end; ``run`` returns once the current step gives up."""
        self._stop.set()

    def run(self) -> None:
        """The thread's body: sessions until ``stop()``, a failed one retried with backoff."""
        while not self._stop.is_set():
            retrying = tenacity.Retrying(
                # Capped near the poll interval: an outage delays an update by
                # about one interval after Redis is back.
                wait=reconnect_backoff(min(5.0, max(self.poll_interval, 0.5))),
                retry=tenacity.retry_if_not_exception_type((_Dropped, Stopped)),
                stop=tenacity.stop_when_event_set(self._stop),
                sleep=self._stop.wait,  # type: ignore[arg-type]
                before_sleep=self._failed,
                reraise=True,
            )
            try:
                retrying(self._session)
            except _Dropped as e:
                # Backoff starts over: a session that worked is a new outage.
                self.exception_handler(e.__cause__ or e)
            except Stopped:
                break
            except Exception as e:
                if not self._stop.is_set():  # pragma: no cover - the retry never gives up
                    log.exception("delivery loop failed: %s", e)

    def _failed(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if error is not None:
            self.exception_handler(error)

    def _session(self) -> None:
        """One connection's life: head at once, then notices as they come and polls when due."""
        self.store.ping()
        listening: Subscription | None = self.store.subscribe()
        # When to subscribe again after the subscription failed (None: it did not).
        relisten_at: float | None = None
        healthy = False
        try:
            self.handler.handle(CONNECTED)
            # Only a session that got as far as checking head counts as
            # recovered: one that fails again at once is the same outage.
            healthy = True
            pace = Pacing(self._clock(), self.poll_interval)
            while not self._stop.is_set():
                request: Request | None = None
                if relisten_at is not None and self._clock() >= relisten_at:
                    listening = self._listen_once()
                    if listening is None:
                        relisten_at = self._clock() + min(RELISTEN_GAP, self.poll_interval)
                    else:
                        relisten_at = None
                        request = CONNECTED  # what was said meanwhile went unheard
                elif listening is None and relisten_at is None and pace.listen_again(self._clock()):
                    listening = self.store.subscribe()
                batch: list[bytes] = []
                if request is None:
                    batch, lost = self._take(listening, pace.wait(self._clock(), TICK))
                    if lost is not None and listening is not None:
                        self._lost_channel(lost)
                        listening.close()
                        listening = None
                        relisten_at = self._clock()
                    request = self._hear(batch, pace)
                if listening is not None and not pace.listening:
                    listening.close()  # a flood: Redis drops what waits for us
                    listening = None
                if request is None:
                    due = pace.due(self._clock())
                    request = None if due is None else LOOK if due is Due.LOOK else POLL
                if request is not None:
                    self.handler.handle(request)
                    at_head = request.version is None
                    pace.handled(self._clock(), forced=request.force, at_head=at_head)
                if batch and not _announced_one(batch, request):
                    self._stop.wait(pacing.NOTICE_GAP)
        except Stopped:
            raise
        except Exception as e:
            if healthy:
                raise _Dropped from e
            raise
        finally:
            if listening is not None:
                listening.close()

    def _listen_once(self) -> Subscription | None:
        """A new subscription, tried once; None (and logged) if Redis refused it."""
        channel = keys.events_channel(self.store.ns, self.store.model)
        model = self.store.model

        def once(what: str, fn: Callable[[], object]) -> object:
            return guarded(operation_retry(1), model, what, fn)

        try:
            return Subscription(self.store.client, channel, once)
        except StoreUnavailable as e:
            log.debug("model %r: subscribing again failed: %s", model, e)
            return None

    def _lost_channel(self, error: BaseException) -> None:
        log.warning(
            "model %r: the notice channel failed (%s: %s); reading head every %gs "
            "and subscribing again",
            self.store.model,
            type(error).__name__,
            error,
            self.poll_interval,
        )

    def _take(
        self, listening: Subscription | None, wait: float
    ) -> tuple[list[bytes], BaseException | None]:
        """The notices of one wake-up: the first within ``wait`` seconds, then those
        already queued behind it, up to ``pacing.NOTICE_BATCH``; and the error that
        ended the subscription, if one did (what came before it is kept)."""
        if listening is None:
            self._stop.wait(wait)
            return [], None
        batch: list[bytes] = []
        try:
            first = listening.get(wait)
            if first is None:
                return [], None
            batch, size = [first], len(first)
            while not pacing.flood(len(batch), size) and (more := listening.get(0.0)) is not None:
                batch.append(more)
                size += len(more)
        except TRANSIENT as e:
            return batch, e
        return batch, None

    def _hear(self, batch: list[bytes], pace: Pacing) -> Request | None:
        """The request to handle at once for one batch: the last notice naming a
        version (notices arrive in commit order, so a burst goes straight to the
        newest); any other that asks for something is one look at head, owed to
        ``pace``."""
        if not batch:
            return None
        named: Request | None = None
        look = follow = False
        for raw in batch:
            request = self.handler.wanted(raw)
            if request is None:
                continue
            if request.reason is Reason.FOLLOW:
                follow = True
                continue
            if request.version is None:
                look = True
                continue
            if named is not None and (named.version or 0) > request.version:
                look = True  # out of commit order: a forged notice, or a rollback; head decides
            named = request
        now = self._clock()
        pace.hear(now, look=look, flood=pacing.flood(len(batch), sum(map(len, batch))))
        if named is None:
            return FOLLOW if follow else None
        return dataclasses.replace(named, recheck=pace.may_force(now))


def _announced_one(batch: list[bytes], request: Request | None) -> bool:
    """Whether a wake-up heard a single notice naming a version to read: the common
    case of one publish, handled without the pause between wake-ups (which bounds
    what a stream of notices costs: a fast stream arrives in batches, which pause)."""
    return len(batch) == 1 and request is not None and request.version is not None
