"""Canary rollouts: a version runs on a few agents, is watched, then widens or goes back.

``Rollout(publisher, version, canary="10%", steps=["50%"], bake=120).run()``
takes a version published with ``promote=False`` (head has not moved) and:

1. pins it for the step's agents (``hotswap.pins``): every live agent of the
   canary track, then live agents in a fixed order up to the step's size;
   nobody else can apply it, since head has not moved;
2. waits until each of them runs it, then *bakes*: watches them for
   ``bake`` seconds (``publisher.canary.judge``: a rejection, a failed probe,
   a lost heartbeat, a health number over its limit, or not applying in
   time is a failure);
3. on a failure, takes every pin away at once: the canaries revert from
   host memory (no fetch) and the rest never saw the version; the outcome
   is ``rolled_back`` with the reason;
4. otherwise widens to the next step, and at ``100%`` makes the version
   head (``Publisher.promote``): ``promoted``.

The state lives in Redis (``hotswap.rollouts``) under an owner lease: a
second rollout of the model is refused while the lease lives, and a rollout
rerun after its process died resumes where the record says. Anything that
moves head meanwhile (a newer publish, a rollback) ends every pin at once;
the rollout then ends ``superseded``. The state machine: docs/design.md.

Example::

    v = pub.publish(state_dict, promote=False)
    outcome = Rollout(pub, v, canary="10%", bake=120, limits=["max:error_rate=0.01"]).run()
    outcome.state  # 'promoted' or 'rolled_back' (outcome.reason says why)
"""

from __future__ import annotations

import getpass
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hotswap import metrics, status
from hotswap.errors import ConfigError, FormatError, HotswapError, NotFound, VersionConflict
from hotswap.pins import Pin, PinIO, agent_field, track_field
from hotswap.rollouts import ENDED, Limit, Record, RolloutIO
from hotswap.store import Store
from publisher import canary as canaries
from publisher.canary import Seen, Strikes
from publisher.publisher import Publisher

# How long, after taking pins back, the rollout waits to see its canaries off
# the version (it reports how many were; the outcome does not depend on it).
SETTLE_SECONDS = 10.0


class RolloutBusy(HotswapError):
    """Another process drives this model's rollout (its lease lives)."""


@dataclass(frozen=True)
class Outcome:
    """How a rollout ended: ``state`` is ``promoted``, ``rolled_back``, ``superseded`` or
    ``aborted``; ``reason`` says why (for all but ``promoted``)."""

    state: str
    version: int
    reason: str | None
    record: Record | None = None

    @property
    def promoted(self) -> bool:
        return self.state == "promoted"


def parse_limits(texts: Sequence[str]) -> list[Limit]:
    """Limits written ``max:NAME=VALUE`` or ``min:NAME=VALUE``."""
    out = []
    for text in texts:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in ("max", "min"):
            raise ConfigError(f"health limit {text!r}: write max:NAME=NUMBER or min:NAME=NUMBER")
        try:
            out.append(Limit.parse(kind, rest))
        except FormatError as e:
            raise ConfigError(str(e)) from None
    return out


class Rollout:
    """Drives one rollout (see the module docstring).

    Args:
        publisher: the model's publisher (its store, and ``promote``).
        version: a version published without promotion, on top of head.
        canary: the first step: a share of live agents (``"10%"``) or a count.
        steps: the widenings after it; ``100%`` (promotion) is always last.
        bake: seconds each step is watched once all its agents run the version.
        limits: health numbers canaries must keep (``Limit``s, or ``max:NAME=V``).
        failure_limit: samples over a limit tolerated per agent before failing.
        apply_timeout: seconds a step's agents have to run the version.
        track: the track whose agents are canaries first (HOTSWAP_TRACK).
        lease: seconds the owner lease lives without renewal.
        tick: seconds between two looks at the fleet.
        say: called with each verdict as it is made (the CLI prints them).
    """

    def __init__(
        self,
        publisher: Publisher,
        version: int,
        *,
        canary: str = "10%",
        steps: Sequence[str] = (),
        bake: float = 60.0,
        limits: Sequence[Limit | str] = (),
        failure_limit: int = 0,
        apply_timeout: float = 60.0,
        track: str = "canary",
        lease: float = 10.0,
        tick: float = 0.1,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if publisher.settings.key_bytes():
            raise ConfigError(
                "hotswap rollout does not work with signing keys yet: agents that verify "
                "signed heads follow only the signed head, never an unsigned pin; publish "
                "and promote instead"
            )
        if bake < 0 or apply_timeout <= 0 or lease <= 0 or failure_limit < 0:
            raise ConfigError("rollout: bake >= 0, apply_timeout > 0, lease > 0, failures >= 0")
        self.publisher, self.version = publisher, int(version)
        self.store: Store = publisher.store
        self.plan = canaries.steps(canary, steps)
        self.bake, self.failure_limit, self.apply_timeout = bake, failure_limit, apply_timeout
        self.limits = [x if isinstance(x, Limit) else parse_limits([x])[0] for x in limits]
        self.track, self.lease, self.tick = track, lease, tick
        self.say = say or (lambda _text: None)
        self.io = RolloutIO(self.store, owner=f"{socket.gethostname()}-{time.time_ns() % 10**9}")
        self.pins = PinIO(self.store)
        self.stop = threading.Event()
        self._strikes = Strikes()

    # -- the public entry points ------------------------------------------------

    def run(self) -> Outcome:
        """Drive the rollout to its end (or resume one whose owner died).

        Raises:
            RolloutBusy: another process holds this model's rollout lease.
            ConfigError: the version is not one to roll out, no agent is live,
                or an unfinished rollout of another version waits.
            StoreUnavailable: Redis could not be reached (rerun: it resumes).
        """
        self._take()
        try:
            record = self._resume_or_begin()
            if isinstance(record, Outcome):
                return record
            return self._drive(record)
        finally:
            self.io.release()

    def _take(self) -> None:
        lease = self.io.take(self.lease)
        if not lease.ours:
            raise RolloutBusy(
                f"model {self.store.model!r}: a rollout is driven by {lease.owner} (its lease "
                f"has {lease.left_ms / 1000:.1f}s left); wait for it to end, or for the lease "
                "to expire if that process died, then run this again to resume it"
            )

    # -- starting -------------------------------------------------------------------

    def _resume_or_begin(self) -> Record | Outcome:
        try:
            record = self.io.read()
        except FormatError as e:
            self.say(f"the rollout record in Redis does not decode ({e}); starting anew")
            record = None
        if record is not None and record.running:
            if record.version != self.version:
                raise ConfigError(
                    f"model {self.store.model!r}: the rollout of v{record.version} is "
                    f"unfinished (step {record.step + 1} of {len(record.steps)}); resume it "
                    f"with `hotswap rollout {self.store.model} {record.version}` or end it "
                    f"with `hotswap rollout {self.store.model} --abort`"
                )
            self.say(
                f"resuming the rollout of v{record.version} at step {record.step + 1} of "
                f"{len(record.steps)} ({record.steps[record.step]}), with the steps, bake "
                f"({record.bake:g}s) and limits it started with"
            )
            record.owner = self.io.owner
            return record
        return self._begin()

    def _begin(self) -> Record | Outcome:
        head = self.store.head()
        if head == self.version:
            self.say(f"v{self.version} is head already: nothing to roll out")
            return Outcome("promoted", self.version, None)
        try:
            manifest = self.store.manifest(self.version)
        except NotFound:
            raise ConfigError(
                f"model {self.store.model!r} has no v{self.version} (collected by gc, or never "
                "published); publish it with --no-promote first"
            ) from None
        if head is None or manifest.parent != head:
            raise ConfigError(
                f"model {self.store.model!r}: v{self.version} was published on top of "
                f"v{manifest.parent}, but head is {'none' if head is None else f'v{head}'}; "
                "publish it again with --no-promote on top of head"
            )
        fleet = self._fleet()
        if not any(s.live for s in fleet):
            raise ConfigError(
                f"model {self.store.model!r}: no live agent to be a canary; start the "
                "serving processes first (hotswap status lists them)"
            )
        now = self.io.now()
        record = Record(
            rollout_id=f"{self.version}-{int(now)}",
            model=self.store.model,
            version=self.version,
            base=head,
            steps=self.plan,
            bake=float(self.bake),
            started=now,
            track=self.track,
            limits=[(x.name, x.kind, x.value) for x in self.limits],
            failure_limit=self.failure_limit,
            apply_timeout=float(self.apply_timeout),
            owner=self.io.owner,
        )
        record.say(f"started: v{self.version} from v{head}, steps {', '.join(self.plan)}")
        self.say(record.verdicts[-1])
        self._write(record)
        self._log(record, "started", f"steps {', '.join(self.plan)}, bake {self.bake:g}s")
        return record

    # -- the loop ---------------------------------------------------------------------

    def _drive(self, record: Record) -> Outcome:
        while not self.stop.is_set():
            now = self.io.now()
            self._renew()
            head = self.store.head()
            if head != record.base:
                return self._superseded(record, head)
            fleet = self._fleet()
            if record.step_started is None:
                self._start_step(record, fleet, now)
                continue
            self._add_track_agents(record, fleet)
            verdict = canaries.judge(record, fleet, self._strikes, now)
            if verdict.failed is not None:
                return self._roll_back(record, verdict.failed, now)
            if verdict.ready and record.baking_since is None:
                record.baking_since = now
                record.say(
                    f"step {record.step + 1}: all {len(record.members)} agents run "
                    f"v{record.version}; baking {record.bake:g}s"
                )
                self.say(record.verdicts[-1])
                self._write(record)
            if record.baking_since is not None and now - record.baking_since >= record.bake:
                outcome = self._next_step(record, now)
                if outcome is not None:
                    return outcome
                continue
            self.stop.wait(self.tick)
        return self._abort(record, "interrupted")

    def _start_step(self, record: Record, fleet: Sequence[Seen], now: float) -> None:
        record.members = canaries.members(record, fleet)
        pins = {agent_field(a): Pin(record.version, record.base) for a in record.members}
        pins[track_field(record.track)] = Pin(record.version, record.base)
        self.pins.write(pins)
        metrics.rollout_step(record.model, record.step + 1)
        record.step_started, record.baking_since = now, None
        shown = ", ".join(record.members[:8]) + (" ..." if len(record.members) > 8 else "")
        record.say(
            f"step {record.step + 1} of {len(record.steps)} ({record.steps[record.step]}): "
            f"v{record.version} pinned for {len(record.members)} agents: {shown}"
        )
        self.say(record.verdicts[-1])
        self._write(record)

    def _add_track_agents(self, record: Record, fleet: Sequence[Seen]) -> None:
        """Agents of the canary track that came up during the step are members too."""
        new = [
            s.agent_id
            for s in fleet
            if s.live
            and s.status is not None
            and s.status.track == record.track
            and s.agent_id not in record.members
        ]
        if new:
            record.members = [*record.members, *new]
            self._write(record)

    def _next_step(self, record: Record, now: float) -> Outcome | None:
        if record.step + 1 >= len(record.steps) - 1:
            return self._promote(record, now)
        record.step += 1
        record.step_started = record.baking_since = None
        self._write(record)
        return None

    # -- endings ------------------------------------------------------------------------

    def _promote(self, record: Record, now: float) -> Outcome:
        try:
            self.publisher.promote(record.version, message=f"rollout {record.rollout_id}")
        except VersionConflict:
            head = self.store.head()
            if head != record.version:
                return self._superseded(record, head)
        self.pins.clear_all()
        return self._end(record, "promoted", None, now)

    def _roll_back(self, record: Record, reason: str, now: float) -> Outcome:
        # Pins first: the canaries revert the moment they hear of it.
        self.pins.clear_all()
        self.say(f"rolling back: {reason}")
        outcome = self._end(record, "rolled_back", reason, now)
        self._settle(record)
        return outcome

    def _superseded(self, record: Record, head: int | None) -> Outcome:
        if head == record.version:
            self.pins.clear_all()
            return self._end(record, "promoted", None, self.io.now())
        shown = "none" if head is None else f"v{head}"
        reason = (
            f"head moved from v{record.base} to {shown} (a newer publish or a rollback); "
            "the pins ended with it, so canaries follow head"
        )
        self.pins.clear_all()
        return self._end(record, "superseded", reason, self.io.now())

    def _abort(self, record: Record, reason: str) -> Outcome:
        self.pins.clear_all()
        return self._end(record, "aborted", reason, self.io.now())

    def _end(self, record: Record, state: str, reason: str | None, now: float) -> Outcome:
        record.state, record.reason, record.ended = state, reason, now
        text = state.replace("_", " ") + (f": {reason}" if reason else "")
        record.say(text)
        self.say(record.verdicts[-1])
        self._write(record)
        self._log(record, state.replace("_", " "), reason or "")
        metrics.rollout_ended(record.model, state)
        return Outcome(state, record.version, reason, record)

    def _settle(self, record: Record) -> None:
        """Wait (bounded) to see the members leave the version; say how many did."""
        deadline = time.monotonic() + SETTLE_SECONDS
        left: list[str] = list(record.members)
        while left and time.monotonic() < deadline:
            by_id = {s.agent_id: s for s in self._fleet()}
            left = [
                a
                for a in record.members
                if (s := by_id.get(a)) is not None
                and s.live
                and s.status is not None
                and s.status.version == record.version
            ]
            if left:
                self.stop.wait(self.tick)
        back = len(record.members) - len(left)
        self.say(f"{back} of {len(record.members)} canaries back on v{record.base}")

    # -- Redis --------------------------------------------------------------------------

    def _fleet(self) -> list[Seen]:
        out = []
        for r in self.store.agent_report().records:
            st = None
            if r.data is not None:
                try:
                    st = status.decode(r.data)
                except FormatError:
                    st = None
            out.append(Seen(r.agent_id, st, r.alive))
        return out

    def _renew(self) -> None:
        if not self.io.write(self.lease):
            raise RolloutBusy(
                f"model {self.store.model!r}: this rollout lost its lease (it was paused "
                "longer than the lease); another process may drive it now"
            )

    def _write(self, record: Record) -> None:
        if not self.io.write(self.lease, record):
            raise RolloutBusy(
                f"model {self.store.model!r}: this rollout lost its lease before writing "
                "its record; another process may drive it now"
            )

    def _log(self, record: Record, event: str, message: str) -> None:
        self.store.append_log(
            {
                "version": record.version,
                "kind": f"rollout {event}",
                "created": time.time(),
                "author": f"{getpass.getuser()}@{socket.gethostname()}",
                "message": message[:500],
                "rollout": record.rollout_id,
            }
        )


def abort(publisher: Publisher, reason: str = "aborted by hand") -> Outcome | None:
    """End the model's unfinished rollout: take every pin back (canaries return to head).

    Raises:
        RolloutBusy: another process holds the lease (it drives the rollout).

    Returns:
        How it ended, or None when no rollout was unfinished.

    Example::

        abort(pub, "v7 looks wrong")
    """
    try:
        found = RolloutIO(publisher.store).read()
    except FormatError:
        found = None
    driver = Rollout(publisher, 0 if found is None else found.version)
    driver._take()
    try:
        record = driver.io.read() if found is not None else None
        if record is None or record.state in ENDED:
            driver.pins.clear_all()  # a garbled record may have left pins
            return None
        return driver._abort(record, reason)
    finally:
        driver.io.release()
