"""When the delivery loop reads notices, reads head, and listens at all: pure timing, no I/O.

Anyone who may PUBLISH can flood a model's channel, and a notice proves
nothing until Redis is read. So what notices may cost is bounded here, not by
their rate: the loop reads at most ``NOTICE_BATCH`` notices (or
``NOTICE_BATCH_BYTES``) a wake-up and pauses ``NOTICE_GAP`` after each
wake-up that heard more than one notice naming a version to read (one
publish's notice goes straight through), so a trickle is read in batches; a
wake-up that finds
a full batch waiting is a flood, and the loop stops listening for a while
(``SHED_FIRST``, doubled for each flood in a row up to ``SHED_MAX``),
reading head every ``LOOK_GAP`` meanwhile. Notices that name nothing to read
(garbled, or no newer than what runs) ask for a full look at head, at most
one per ``LOOK_GAP``. A notice that names a newer version is acted on at once.

Times are the delivery loop's clock (``Agent(clock=...)``), in seconds.
"""

from __future__ import annotations

import enum

# Most notices (and bytes of notices) read in one wake-up: more waiting than
# that is a flood, since a publisher sends one notice per commit.
NOTICE_BATCH = 64
NOTICE_BATCH_BYTES = 1024 * 1024
# Pause after a wake-up that heard more than one publish's notice: a steady
# trickle is read in batches, so a flood's cost does not grow with its rate.
NOTICE_GAP = 0.05
# Least seconds between two full looks at head that notices ask for without
# naming what to read; also how often head is read while not listening.
LOOK_GAP = 0.5
# Seconds of not listening after a flood, doubled while floods follow.
SHED_FIRST = 1.0
SHED_MAX = 16.0


class Due(enum.Enum):
    """What the loop owes now besides notices."""

    LOOK = "a full look at head that notices asked for"
    POLL = "the poll interval passed"


def flood(count: int, nbytes: int) -> bool:
    """Whether one wake-up's batch was full: more notices are waiting than a publisher sends."""
    return count >= NOTICE_BATCH or nbytes >= NOTICE_BATCH_BYTES


class Pacing:
    """The delivery loop's timers for one session.

    Args:
        now: the session's start.
        poll_interval: seconds between two reads of head while listening.

    Example::

        pace = Pacing(now=0.0, poll_interval=5.0)
        pace.hear(0.0, look=True, flood=False)  # a garbled notice
        pace.due(0.0)  # Due.LOOK: the first full look is spent at once
        pace.handled(0.0, forced=True, at_head=True)
        pace.hear(0.1, look=True, flood=False)
        pace.due(0.1)  # None: the next one waits until 0.5
    """

    def __init__(self, now: float, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.next_poll = now + poll_interval
        # A full look at head that notices asked for, not yet spent.
        self.look_at: float | None = None
        self.last_look = float("-inf")
        # Not listening until then (None: listening).
        self.deaf_until: float | None = None
        # Seconds the last flood was shed for (0: none yet).
        self.shed = 0.0
        self.listening_since = now

    @property
    def listening(self) -> bool:
        return self.deaf_until is None

    def wait(self, now: float, tick: float) -> float:
        """Seconds to wait for a notice before something else is due (at most ``tick``)."""
        due = [self.next_poll]
        if self.look_at is not None:
            due.append(self.look_at)
        if self.deaf_until is not None:
            due.append(self.deaf_until)
        return max(0.0, min(tick, min(due) - now))

    def may_force(self, now: float) -> bool:
        """Whether a full look at head may be spent now."""
        return now >= self.last_look + LOOK_GAP

    def hear(self, now: float, *, look: bool, flood: bool) -> None:
        """Take one wake-up's batch in.

        Args:
            now: the time.
            look: some notice asks for a full look at head: one is owed, at
                most one per ``LOOK_GAP``.
            flood: the batch was full: stop listening (the caller closes the
                subscription) and read head every ``LOOK_GAP`` meanwhile.
        """
        if flood:
            calm = not self.shed or now - self.listening_since > 2 * self.shed
            self.shed = SHED_FIRST if calm else min(2 * self.shed, SHED_MAX)
            self.deaf_until = now + self.shed
            self.next_poll = min(self.next_poll, now + LOOK_GAP)
        if look and self.look_at is None:
            self.look_at = max(now, self.last_look + LOOK_GAP)

    def listen_again(self, now: float) -> bool:
        """Whether to subscribe again after a flood; if so, head is read at once
        (notices said meanwhile were not heard)."""
        if self.deaf_until is None or now < self.deaf_until:
            return False
        self.deaf_until = None
        self.listening_since = now
        self.next_poll = now
        return True

    def due(self, now: float) -> Due | None:
        """A look that notices asked for, once due; else a poll, once due (nothing
        once the loop is to listen again: it reads head right after subscribing)."""
        if self.deaf_until is not None and now >= self.deaf_until:
            return None
        if self.look_at is not None and now >= self.look_at:
            return Due.LOOK
        if now >= self.next_poll:
            return Due.POLL
        return None

    def handled(self, now: float, *, forced: bool, at_head: bool) -> None:
        """A request was handled: the poll timer starts over.

        Args:
            now: the time.
            forced: it may have read head in full: the next full look waits
                ``LOOK_GAP``.
            at_head: it looked at head (no version named): it settles the look
                owed, if it was full.
        """
        if forced:
            self.last_look = now
            if at_head:
                self.look_at = None
        every = self.poll_interval if self.listening else min(LOOK_GAP, self.poll_interval)
        self.next_poll = now + every
