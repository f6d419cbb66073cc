"""The agent's delivery loop: subscribe, poll head, reconnect with backoff, never give up.

A notice names the version it announces, and ``check`` starts on that
version straight away: from the manifest bytes the notice carries, or else by
reading that version's manifest (one round trip). Either is verified as
always, and carried bytes are compared with Redis's before anything is
applied or refused, so a forged notice can at worst cost one fetch. ``head`` is
read on every ``poll_interval`` and right after every (re)connect, because
pub/sub drops what is said while a client is away, so a newer head than a
notice named is caught by the next poll. Any failure ends the session; a new
one starts with tenacity backoff, which starts over after a session that
worked. Each change of state is logged once, not each retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
import tenacity

from hotswap.connection import reconnect_backoff
from hotswap.errors import HotswapError
from hotswap.reporter import Reporter
from hotswap.store import Store, Subscription

log = logging.getLogger("hotswap.agent")
# Longest the loop waits on the channel before it looks at its timers and stop flag.
TICK = 0.2


class Stopped(Exception):
    """Raised inside the loop to abandon work once ``stop`` is set."""


class _Dropped(Exception):
    """A session that had worked lost its connection: reconnect at once."""


Wanted = tuple[bool, int | None, bytes | None]
"""What a notice asks for: (look at all, the version it names or None for head,
the manifest bytes it carries for that version or None)."""


class Delivery:
    """Runs ``check(force, version, carried)`` whenever head may have moved, across
    Redis outages.

    ``version`` is the version a notice announced, or None to read ``head``;
    ``carried`` the manifest bytes that notice carried.
    ``wanted(raw)`` says whether a raw notice is worth a look, and at what.
    """

    def __init__(
        self,
        store: Store,
        reporter: Reporter,
        poll_interval: float,
        *,
        check: Callable[[bool, int | None, bytes | None], None],
        wanted: Callable[[bytes], Wanted],
        serving: Callable[[], str],
        connected: Callable[[], None],
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.reporter = reporter
        self.poll_interval = poll_interval
        self.check, self.wanted, self.serving = check, wanted, serving
        self.connected = connected
        self.stop = stop or threading.Event()
        self._logged: str | None = None
        self._healthy = False

    def log_once(self, key: str, level: int, message: str) -> None:
        """Log ``message`` unless the last thing logged had the same ``key``."""
        if self._logged != key:
            self._logged = key
            log.log(level, "%s", message)

    def note(self, key: str) -> None:
        """Record a state change logged elsewhere, so the next repeat logs again."""
        self._logged = key

    def run(self) -> None:
        """The thread's body: returns only once ``stop`` is set."""
        while not self.stop.is_set():
            retrying = tenacity.Retrying(
                # Capped near the poll interval: an outage delays an update by
                # about one interval after Redis is back.
                wait=reconnect_backoff(min(5.0, max(self.poll_interval, 0.5))),
                retry=tenacity.retry_if_not_exception_type((_Dropped, Stopped)),
                stop=tenacity.stop_when_event_set(self.stop),
                sleep=self.stop.wait,  # type: ignore[arg-type]
                before_sleep=self._failed,
                reraise=True,
            )
            try:
                retrying(self._session)
            except _Dropped as e:
                self._lost(e.__cause__)
            except Stopped:
                break
            except Exception as e:
                if not self.stop.is_set():  # pragma: no cover - the retry never gives up
                    log.exception("delivery loop failed: %s", e)

    def _failed(self, state: tenacity.RetryCallState) -> None:
        self._lost(state.outcome.exception() if state.outcome else None)

    def _lost(self, e: BaseException | None) -> None:
        self.reporter.update(state="disconnected", last_error=f"{type(e).__name__}: {e}")
        key = f"lost:{type(e).__name__}"
        if isinstance(e, (HotswapError, redis.RedisError, OSError)):
            self.log_once(
                key,
                logging.WARNING,
                f"model {self.store.model!r}: Redis unreachable or failing ({type(e).__name__}: "
                f"{e}); still serving {self.serving()}, reconnecting with backoff",
            )
        elif self._logged != key:
            self._logged = key
            # Not Redis: a bug or the host (memory?). Worth a traceback, once.
            log.error(
                "model %r: unexpected %s while updating; still serving %s, retrying with backoff",
                self.store.model,
                type(e).__name__,
                self.serving(),
                exc_info=e,
            )

    def _session(self) -> None:
        self.store.ping()
        subscription = self.store.subscribe()
        self._healthy = False
        try:
            if self.reporter.status.state in ("starting", "disconnected"):
                self.connected()
            logged = self._logged
            self.check(True, None, None)
            # Only a session that got as far as checking head counts as
            # recovered: one that fails again at once is the same outage.
            self._healthy = True
            if logged is not None and logged.startswith("lost:"):
                log.info("model %r: connected to Redis again, head checked", self.store.model)
            if self._logged == logged:
                self._logged = "connected"
            interval = self.poll_interval
            next_poll = time.monotonic() + interval
            while not self.stop.is_set():
                raw = subscription.get(min(TICK, max(0.0, next_poll - time.monotonic())))
                look, version, carried = (
                    self._newest(raw, subscription) if raw is not None else (False, None, None)
                )
                if look:
                    self.check(True, version, carried)
                    next_poll = time.monotonic() + interval
                elif time.monotonic() >= next_poll:
                    self.check(False, None, None)
                    next_poll = time.monotonic() + interval
        except Stopped:
            raise
        except Exception as e:
            if self._healthy:
                raise _Dropped from e
            raise
        finally:
            subscription.close()

    def _newest(self, raw: bytes, subscription: Subscription) -> Wanted:
        """The newest request among ``raw`` and the notices already queued behind it.

        Notices that arrived together (a burst of publishes, or a publish and a
        rollback) are read without waiting, so the loop goes straight to the
        last one instead of applying each in turn; a garbled one means head.
        """
        look, version, carried = self.wanted(raw)
        while (more := subscription.get(0.0)) is not None:
            now_look, now_version, now_carried = self.wanted(more)
            if now_look:
                if not look or version is not None:
                    version, carried = now_version, now_carried
                look = True
        return look, version, carried
