"""The agent's update path, top to bottom: request -> manifest -> stage -> confirm -> act.

``Pipeline.handle`` takes one request of the delivery loop to its end:
``Lookout`` names the manifest to consider (the one a notice carried, the one
it named, or head's); ``intake`` maps its names onto the model's (refusing
one that reaches too few of them) and ``staging.prepare`` fetches and
validates the tensors that differ from what runs; a manifest a notice carried is confirmed against
the one Redis holds; then the version is applied (auto mode), refused (it
failed validation) or left pending for ``apply_pending()`` (manual mode).

What runs, was refused or waits lives in ``RunState`` behind its lock; the
head last seen is ``Lookout``'s (its own lock), what was said last is
``LogOnce``'s, and the live tensors are guarded by the gate's writer side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal

import redis

from hotswap import callbacks, metrics, postapply, unpublished, validate
from hotswap.callbacks import OnApplied, OnRejected
from hotswap.delivery import LOOK, Reason, Request, Stopped
from hotswap.errors import HotswapError, ValidationError
from hotswap.gate import Gate
from hotswap.hostmem import HostMemory
from hotswap.intake import Intake
from hotswap.logonce import LogOnce
from hotswap.lookout import Lookout
from hotswap.looks import Candidate, Confirmation, Quiet, Refused
from hotswap.manifest import Manifest
from hotswap.postapply import Probe
from hotswap.priority import Foreground
from hotswap.probation import Probations
from hotswap.reporter import ApplyReport, Reporter
from hotswap.runstate import Ready, Rejection, RunState, Undo
from hotswap.settings import HotswapSettings
from hotswap.staging import LiveModel, Staged, Staging
from hotswap.store import Store
from hotswap.writer import Writer, Written

log = logging.getLogger("hotswap.agent")
Mode = Literal["auto", "manual"]


class Outcome(Enum):
    """How considering one manifest ended."""

    SKIPPED = "it runs, was refused, or waits already"
    APPLIED = "applied"
    REJECTED = "refused: it failed validation"
    PENDING = "valid, waiting for apply_pending()"
    UNCONFIRMED = "a notice carried it and Redis holds otherwise: nothing changed"
    REPLAN = "apply_pending() ran meanwhile: plan again against what runs now"
    # apply_pending() (manual mode) is ``group.apply_newest`` or ``group.apply_pending``.


class Pipeline:
    """One agent's update path; the delivery loop's ``Handler``.

    Args:
        store: the model's store, with the agent's stop-aware retries.
        settings: the signing keys manifests must verify with.
        live: the live tensors to update in place.
        policy: the validation policy.
        mode: ``"auto"`` applies at once, ``"manual"`` leaves it pending.
        staging: where fetched bytes wait (see ``Agent``).
        memory: host staging memory kept between versions.
        reporter: the status record.
        gate: readers-writer lock of the live tensors.
        stop: set once the agent stops: work in progress is abandoned.
        on_applied, on_rejected: the agent's callbacks.
        intake: the agent's name map and transform (default: none).
        probes: checks of the model run after each copy, under the writer lock
            (``hotswap.postapply``); ``model`` is what they are given.
        revert_bytes: the host bytes kept of what a version replaced (None: one
            version's, whatever their size; 0: none, so no revert and no probes).
        foreground: runs the writes under the writer lock for a lowered agent thread.
    """

    def __init__(
        self,
        store: Store,
        settings: HotswapSettings,
        live: LiveModel,
        policy: validate.Policy,
        *,
        mode: Mode,
        staging: Staging,
        memory: HostMemory,
        reporter: Reporter,
        gate: Gate,
        stop: threading.Event,
        on_applied: OnApplied | None = None,
        on_rejected: OnRejected | None = None,
        intake: Intake | None = None,
        probes: Sequence[Probe] = (),
        model: Any = None,
        revert_bytes: int | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        self.model_name = store.model

        self.intake = intake or Intake()
        self.store, self.live, self.policy = store, live, policy
        self.mode, self.staging = mode, staging
        self.reporter = reporter
        self.on_applied, self.on_rejected = on_applied, on_rejected
        self.state = RunState(policy, reporter)
        self.writer = Writer(
            self.model_name,
            live,
            self.state,
            gate,
            probes=probes,
            model=model,
            revert_bytes=revert_bytes,
            foreground=foreground,
        )
        self.probations = Probations(
            postapply.probations(probes), self.writer, gate, stop, self.reverted
        )
        self.lookout = Lookout(store, settings, reporter.status.agent_id, settings.track)
        self._memory, self._gate, self._stop = memory, gate, stop
        self._said = LogOnce()
        # The manifest digest of the last version applied because a rollout pinned
        # this agent to it (None: the last followed head).
        self._pinned_apply: str | None = None
        # Whether the agent warned that nothing is published under its name
        # (once: a misspelled name must show, not fill the log every poll).
        self._warned_unpublished = False

    # -- the delivery loop's handler (the agent's thread) -------------------------

    def start(self) -> None:
        """Learn what runs: the digest of every live tensor (first thing on the thread)."""
        self.state.start(self.live.digests())

    def wanted(self, raw: bytes) -> Request | None:
        """The request a raw notice makes (``delivery.Handler``)."""
        return self.lookout.wanted(raw, self.state.running())

    def handle(self, request: Request) -> None:
        """Take one request to its end (``delivery.Handler``); raises to end the session."""
        if request.reason is Reason.POLL and self.state.take_relook():
            request = LOOK  # an apply dropped newer pending versions: stage head again
        try:
            if request.reason is Reason.CONNECTED:
                self._reconnect(request)
            else:
                self._update(request)
        finally:
            self.state.stepped()

    def lost(self, e: BaseException) -> None:
        """The delivery loop's exception handler: report the outage, log it once."""
        self.reporter.update(state="disconnected", last_error=f"{type(e).__name__}: {e}")
        key, name, serving = f"lost:{type(e).__name__}", type(e).__name__, self.state.serving()
        if isinstance(e, (HotswapError, redis.RedisError, OSError)):
            self._said.say(
                key,
                logging.WARNING,
                f"model {self.model_name!r}: Redis unreachable or failing ({name}: {e}); "
                f"still serving {serving}, reconnecting with backoff",
            )
        else:
            # Not Redis: a bug or the host (memory?). Worth a traceback, once.
            self._said.say(
                key,
                logging.ERROR,
                f"model {self.model_name!r}: unexpected {name} while updating; "
                f"still serving {serving}, retrying with backoff",
                e,
            )
        self.state.stepped()

    # -- the path, top to bottom --------------------------------------------------

    def _reconnect(self, request: Request) -> None:
        """A session began: report connected, look at head, say so once after an outage."""
        if self.reporter.status.state in ("starting", "disconnected"):
            self.state.rest(last_error=None)
        said = self._said.last
        self._update(request)
        if said is not None and said.startswith("lost:"):
            log.info("model %r: connected to Redis again, head checked", self.model_name)
        self._said.replace(said, "connected")

    def _update(self, request: Request) -> None:
        """One request: the notice's own manifest if it may be relied on, else Redis's."""
        try:
            self._look_and_act(request)
        finally:
            pin = self.lookout.pin
            self.reporter.update(pinned=None if pin is None else pin.version)

    def _look_and_act(self, request: Request) -> None:
        candidate = self.lookout.carried(request, self.state.running())
        if candidate is not None:
            if self._consider(candidate) is not Outcome.UNCONFIRMED:
                return
            self.state.rest()  # nothing changed; what Redis holds decides
        look = self.lookout.look(request, self.state.running())
        if isinstance(look, Candidate):
            self._consider(look)
        elif isinstance(look, Refused):
            self._refuse(look)
        elif look is Quiet.HEAD_GONE:
            self._head_gone()
        elif self.lookout.looked and self.lookout.head is None:
            self._unpublished()

    def _consider(self, candidate: Candidate) -> Outcome:
        """Stage a manifest unless it runs, was refused or waits already; then act.

        Head's manifest is staged whenever its content differs from what runs,
        even under a number no newer than the applied one (Redis restored from
        an older snapshot): staging compares tensors by digest, so only those
        that differ are fetched. A manifest a notice named must be newer.
        """
        m = candidate.manifest
        running = self.state.running()
        if self.state.known(m, candidate.digest) or (
            not candidate.head and running.covers(m.version, m.lineage)
        ):
            return Outcome.SKIPPED
        if self._revert_to(candidate):
            return Outcome.APPLIED
        lineage = running.lineage
        if lineage is not None and m.lineage != lineage:
            self._said.say(
                f"lineage:{m.lineage}",
                logging.WARNING,
                f"model {self.model_name!r}: head v{m.version} is of a new lineage {m.lineage} "
                f"(Redis lost its data or was reset); comparing tensors by digest",
            )
        elif running.covers(m.version, m.lineage):
            self._said.say(
                f"content:{candidate.digest}",
                logging.WARNING,
                f"model {self.model_name!r}: head v{m.version} holds other content than "
                f"v{running.version} that runs (Redis restored from an older snapshot?); "
                "following head, comparing tensors by digest",
            )
        outcome = Outcome.REPLAN
        # A group's other ranks keep this version pending while this rank stages it.
        self.state.staging_now((m.lineage, m.version, candidate.digest))
        try:
            while outcome is Outcome.REPLAN:
                outcome = self._stage(candidate)
        finally:
            self.state.staging_now(None)
        return outcome

    def _revert_to(self, candidate: Candidate) -> bool:
        """Whether the last apply followed a rollout's pin, what this agent follows now is
        the very manifest that ran before it (the rollout took its canaries back), and that
        apply was reverted from host memory: one copy per tensor, no fetch. The version
        left is not refused here: a rollout may offer it again."""
        last = self.state.undo()
        if (
            last is None
            or last.manifest_digest != self._pinned_apply
            or last.before.digest != candidate.digest
        ):
            return False
        why = f"a rollout took v{last.version} back; v{candidate.manifest.version} runs again"
        done = self.writer.revert(why, only=last.manifest_digest, refuse=False)
        if done is None:
            return False  # another apply came first: stage as usual
        back = last.before
        self.reporter.update(state="idle", version=back.version, manifest_digest=back.digest)
        metrics.reverted(self.model_name)
        self._said.say(
            f"unpinned:{last.version}", logging.INFO, f"model {self.model_name!r}: {why}"
        )
        return True

    def _stage(self, candidate: Candidate) -> Outcome:
        """Fetch and validate what differs from what runs, confirm a carried manifest, act."""
        m = candidate.manifest
        basis = self.state.basis()
        # The reporter's thread writes this while the fetch runs.
        self.reporter.update(state="fetching")
        described, staged, reasons = self.intake.prepare(
            self.store.blobs,
            m,
            self.live,
            basis.digests,
            self.policy,
            mode=self.staging,
            where=f"model {self.model_name!r} v{m.version}",
            between=self._between_tensors,
            memory=self._memory,
            old_norms=basis.norms,
            history=self.store,  # older manifests, for tensors stored as deltas
            ran=basis.ran,
        )
        self.reporter.update(
            fetch_seconds=staged.seconds,
            validate_seconds=staged.validate_seconds,
            bytes_fetched=self.reporter.status.bytes_fetched + staged.bytes_fetched,
        )
        if candidate.carried is not None and not self._confirmed(m, candidate.carried, staged):
            return Outcome.UNCONFIRMED  # nothing is applied or refused on a notice's word
        self.state.learn(described, basis.digests)
        if reasons:
            staged.release()
            self._reject(
                m.version, m.lineage, reasons, None, staged.bytes_fetched, digest=candidate.digest
            )
            return Outcome.REJECTED
        ready = Ready(staged, candidate.digest)
        if self.mode == "manual":
            return self._pend(ready, basis.generation)
        try:
            if self._stop.is_set():
                raise Stopped  # stop() may have given up waiting: change nothing after it
            if not self.lookout.still_followed(m.version):
                self.state.rest()  # a rollout took its pin back during the fetch
                return Outcome.SKIPPED
            self.apply(ready)
        finally:
            staged.release()
        return Outcome.APPLIED

    def _confirmed(self, m: Manifest, carried: bytes, staged: Staged) -> bool:
        """Whether Redis holds ``carried`` as ``m``'s manifest; if not, ``staged`` is released."""
        try:
            confirmed = self.lookout.confirm(m, carried)
        except BaseException:
            staged.release()
            raise
        if confirmed is not Confirmation.CONFIRMED:
            staged.release()
            return False
        return True

    def _between_tensors(self) -> None:
        if self._stop.is_set():
            raise Stopped

    def _pend(self, ready: Ready, generation: int) -> Outcome:
        """Keep a valid version for ``apply_pending()``, unless one ran since it was planned."""
        dropped = self.state.pend(ready, generation, self._stop)
        for staged in dropped:
            staged.release()
        if any(staged is ready.staged for staged in dropped):
            return Outcome.REPLAN
        m = ready.staged.plan.manifest
        log.info("model %r: v%d valid; apply_pending() applies it", self.model_name, m.version)
        return Outcome.PENDING

    def apply(self, ready: Ready) -> None:
        """Copy a staged version into the live tensors (``Writer.apply``), and report it."""
        self.reporter.update(state="applying")
        self.settle(ready, self.writer.apply(ready.staged, ready.digest))

    def settle(self, ready: Ready, written: Written) -> None:
        """Report what ``Writer.apply`` did: a version a probe refused, or one applied."""
        staged = ready.staged
        m = staged.plan.manifest
        if written.refused is not None:
            reasons = {"<probes>": [written.refused]}
            self._reject(m.version, m.lineage, reasons, None, digest=ready.digest)
            return
        report = ApplyReport(
            m.version,
            m.lineage,
            len(staged.plan.changed),
            staged.bytes_fetched,
            staged.seconds,
            staged.validate_seconds,
            written.paused,
            staged.started,
            ready.digest,
            tensors_patched=written.patched,
            tensors_validated_by_patch=staged.checked_by_patch,
        )
        # The reporter's thread writes the record: neither this thread nor
        # apply_pending()'s caller waits for Redis.
        pin = self.lookout.pin
        self._pinned_apply = ready.digest if pin is not None and pin.version == m.version else None
        self.reporter.applied(report, log)
        self._said.note("applied")
        callbacks.call(self.on_applied, m.version, report)
        self.state.decided()  # after the callback: it has run when wait_for returns
        self.probations.start(m.version, ready.digest)

    def revert(self) -> int | None:
        """``Agent.revert`` (``Writer.revert``), reported: the version running again."""
        done = self.writer.revert()
        assert done is not None  # raises instead when there is nothing to revert
        return self.reverted(*done)

    def reverted(self, last: Undo, error: ValidationError) -> int | None:
        """Report a revert ``Writer.revert`` made; the version running again."""
        back = last.before.version
        self.reporter.reverted(last.version, back, last.before.digest, error, log)
        self._said.note(f"rejected:{last.version}")
        callbacks.call(self.on_rejected, last.version, error.reasons)
        return back

    def _reject(
        self,
        version: int,
        lineage: str | None,
        reasons: dict[str, list[str]],
        cause: Exception | None,
        nbytes: int = 0,
        *,
        digest: str | None = None,
    ) -> None:
        error: ValidationError = validate.rejection(self.model_name, version, reasons)
        error.__cause__ = cause
        # The record is written before waiters wake, so they can read it at once.
        self.reporter.rejected(version, error, nbytes, self.state.has_pending(), log)
        self._said.note(f"rejected:{version}")
        callbacks.call(self.on_rejected, version, error.reasons)
        self.state.record_rejection(version, Rejection(lineage, error, digest))

    def _refuse(self, refused: Refused) -> None:
        """Reject a version whose manifest (or signed head) failed its checks, once per
        distinct failure."""
        before = self.state.rejection(refused.version)
        if before is None or str(before.error.__cause__) != str(refused.error):
            reasons = {refused.subject: [str(refused.error)]}
            self._reject(refused.version, None, reasons, refused.error)

    def _unpublished(self) -> None:
        """Warn, once, that no head exists under this name, naming the closest models."""
        if self._warned_unpublished or self.state.running().version is not None:
            return
        self._warned_unpublished = True
        log.warning("%s", unpublished.warning(self.store))

    def _head_gone(self) -> None:
        applied = self.state.running().version
        if applied is not None:
            gone = (
                f"model {self.model_name!r} has no head in Redis (Redis lost its data "
                f"or the model was deleted); still serving v{applied}"
            )
            self.reporter.update(last_error=gone)
            self._said.say("head-gone", logging.WARNING, gone)
