"""What an agent runs, refused and holds pending, behind one lock.

Every field of ``RunState`` is read and written under its lock; readers get
copies or snapshots (``Running``). Two conditions share the lock: one wakes
``wait_for`` when a version is applied or refused, the other wakes
``wait_until`` after any step of the agent. Where the status record must move
together with a field (a version pending), the reporter is updated under the
lock too (``Reporter.update`` only changes memory), so whoever sees one sees
the other. Nothing here does I/O.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hotswap.errors import ValidationError
from hotswap.manifest import Manifest
from hotswap.norms import RunningNorms
from hotswap.ranbefore import RanBefore
from hotswap.reporter import Reporter
from hotswap.staging import Staged
from hotswap.undo import Saved
from hotswap.validate import Policy


@dataclass(frozen=True)
class Running:
    """What the model runs: the applied version, its lineage and the BLAKE3 digest of
    its manifest's wire bytes (None before the first).

    The digest is what identifies content: after Redis is restored from an older
    snapshot, one version number can name two different manifests.
    """

    version: int | None = None
    lineage: str | None = None
    digest: str | None = None

    def covers(self, version: int, lineage: str) -> bool:
        """Whether ``version`` of ``lineage`` is what runs or older (by number only)."""
        return lineage == self.lineage and self.version is not None and version <= self.version


@dataclass(frozen=True)
class Rejection:
    """A refused version: the lineage and manifest digest of the manifest refused
    (None when the manifest itself failed its checks) and the error ``wait_for`` raises."""

    lineage: str | None
    error: ValidationError
    digest: str | None = None


@dataclass(frozen=True)
class Ready:
    """A fetched, valid version waiting for ``apply_pending()``, and its manifest's digest."""

    staged: Staged
    digest: str


@dataclass(frozen=True)
class Undo:
    """What the last apply replaced (``hotswap.undo``), and what ran before it: enough to
    put that back without Redis."""

    version: int
    lineage: str
    manifest_digest: str
    before: Running
    digests: dict[str, str | None]
    norms: dict[str, tuple[str, float] | None]
    saved: list[Saved]


@dataclass(frozen=True)
class Basis:
    """What a version is planned against: the digest of each live tensor, the norms
    known for those bytes, the generation (applies so far) they belong to, and
    the contents this agent ran before (a snapshot)."""

    digests: dict[str, str]
    norms: dict[str, float]
    generation: int
    ran: RanBefore


class RunState:
    """The applied version, live digests and norms, refusals and the pending version.

    Args:
        policy: the validation policy (which norms may be trusted).
        reporter: the status record, updated with the pending version.
    """

    def __init__(self, policy: Policy, reporter: Reporter) -> None:
        self._reporter = reporter
        self._lock = threading.RLock()
        self._decided = threading.Condition(self._lock)
        self._stepped = threading.Condition(self._lock)
        # Guarded by _lock: everything below.
        self._digests: dict[str, str] = {}
        self._norms = RunningNorms(policy)
        # Contents applied before, per name: the relative checks let them back.
        self._ran = RanBefore()
        # Bumped by every apply: a version planned before one must be planned again.
        self._generation = 0
        self._applying = False
        self._applied: int | None = None
        self._lineage: str | None = None
        self._manifest_digest: str | None = None
        self._rejections: dict[int, Rejection] = {}
        self._last_rejection: ValidationError | None = None
        self._pending: Ready | None = None
        # The bytes the last apply replaced (None: over the budget, or reverted).
        self._undo: Undo | None = None

    # -- readers ------------------------------------------------------------------

    def running(self) -> Running:
        with self._lock:
            return Running(self._applied, self._lineage, self._manifest_digest)

    def serving(self) -> str:
        """What runs, for log lines: ``v3``, or ``nothing yet``."""
        with self._lock:
            return "nothing yet" if self._applied is None else f"v{self._applied}"

    @property
    def pending_version(self) -> int | None:
        with self._lock:
            return None if self._pending is None else self._pending.staged.plan.manifest.version

    def has_pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    @property
    def last_rejection(self) -> ValidationError | None:
        with self._lock:
            return self._last_rejection

    def rejection(self, version: int) -> Rejection | None:
        with self._lock:
            return self._rejections.get(version)

    def known(self, m: Manifest, digest: str) -> bool:
        """Whether the manifest ``m`` (wire bytes of BLAKE3 ``digest``) runs, was refused
        or waits. By content, not number: the same number may name other bytes."""
        with self._lock:
            if digest == self._manifest_digest:
                return True
            refused = self._rejections.get(m.version)
            if refused is not None and refused.digest == digest:
                return True
            return self._pending is not None and self._pending.digest == digest

    def basis(self) -> Basis:
        with self._lock:
            digests = dict(self._digests)
            return Basis(digests, self._norms.known(digests), self._generation, self._ran.copy())

    # -- waits --------------------------------------------------------------------

    def wait_for(self, version: int, timeout: float) -> bool:
        """``Agent.wait_for``: True once ``version`` or a newer one runs (its callback run)."""
        deadline = time.monotonic() + timeout
        with self._decided:
            while True:
                refused = self._rejections.get(version)
                if refused is not None:
                    error = refused.error
                    raise ValidationError(str(error), error.reasons) from error.__cause__
                if self._applied is not None and self._applied >= version:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._decided.wait(remaining)

    def wait_until(self, check: Callable[[], bool], timeout: float) -> bool:
        """Whether ``check()`` held within ``timeout`` seconds, asked again after every
        step the agent takes (a request handled, a failure, an apply)."""
        with self._stepped:
            return self._stepped.wait_for(check, timeout)

    def stepped(self) -> None:
        """The agent took a step: ``wait_until`` asks its question again."""
        with self._lock:
            self._stepped.notify_all()

    # -- writers ------------------------------------------------------------------

    def start(self, digests: Mapping[str, str]) -> None:
        """What runs at start: the digest of every live tensor."""
        with self._lock:
            self._digests = dict(digests)

    def learn(self, m: Manifest, digests: Mapping[str, str]) -> None:
        """Trust the norms a confirmed manifest states for bytes that run (``RunningNorms``)."""
        with self._lock:
            self._norms.learn(m, digests)

    def pend(self, ready: Ready, generation: int) -> Staged | None:
        """Keep a valid version for ``apply_pending()`` unless one ran since it was planned.

        Returns:
            The version to release: the one it replaced, ``ready.staged`` itself
            when it came too late (plan again), or None.
        """
        with self._lock:
            if self._applying or self._generation != generation:
                return ready.staged
            replaced, self._pending = self._pending, ready
            # With the pending version: whoever sees one sees the other.
            self._reporter.update(state="pending")
            return None if replaced is None else replaced.staged

    def rest(self, **fields: object) -> None:
        """Report the state between updates (pending if a version waits, else idle)."""
        with self._lock:
            self._reporter.update(state="pending" if self._pending else "idle", **fields)

    def take_pending(self) -> Staged | None:
        """Remove the pending version (the caller releases it)."""
        with self._lock:
            ready, self._pending = self._pending, None
            return None if ready is None else ready.staged

    def begin_apply_pending(self) -> Ready | None:
        """Remove the pending version to apply it on the caller's thread; until
        ``end_apply_pending()``, a version planned meanwhile is planned again."""
        with self._lock:
            ready, self._pending = self._pending, None
            if ready is not None:
                self._applying = True
            return ready

    def end_apply_pending(self) -> None:
        with self._lock:
            self._applying = False
            self._stepped.notify_all()

    def undo(self) -> Undo | None:
        """What the last apply replaced, while it can be put back."""
        with self._lock:
            return self._undo

    def record_applied(self, staged: Staged, digest: str, saved: list[Saved] | None = None) -> None:
        """What runs now, ``digest`` the BLAKE3 of its manifest's wire bytes (call under
        the gate's writer lock, so that a reader never sees new weights with the old
        version number). ``saved``: the bytes it replaced, kept for a revert."""
        m = staged.plan.manifest
        with self._lock:
            changed = staged.plan.changed
            self._undo = (
                None
                if saved is None
                else Undo(
                    m.version,
                    m.lineage,
                    digest,
                    Running(self._applied, self._lineage, self._manifest_digest),
                    {name: self._digests.get(name) for name in changed},
                    self._norms.snapshot(changed),
                    saved,
                )
            )
            for name, entry in staged.plan.changed.items():
                self._digests[name] = entry.digest
            self._norms.applied(staged.plan.changed, staged.norms)
            # Every tensor the version names runs now as it states, fetched or
            # already equal: content a later version may return to.
            self._ran.record(
                (e.name, e.digest) for e in m.tensors if self._digests.get(e.name) == e.digest
            )
            self._generation += 1
            if m.lineage != self._lineage:
                self._rejections = {
                    v: r for v, r in self._rejections.items() if r.lineage in (m.lineage, None)
                }
            # What runs under this number now is not what was refused under it
            # (a replayed record, or other content before a restore).
            self._rejections.pop(m.version, None)
            self._applied, self._lineage = m.version, m.lineage
            self._manifest_digest = digest

    def decided(self) -> None:
        """A version was applied and its callback ran: ``wait_for`` looks again."""
        with self._lock:
            self._decided.notify_all()

    def record_reverted(self, undo: Undo, rejection: Rejection | None) -> None:
        """``undo`` was put back (under the writer lock): what ran before it runs again, and
        its version counts as refused (``rejection``), so that convergence on head does
        not bring it back; None: not refused (a rollout took it back, see ``pins``)."""
        with self._lock:
            for name, was in undo.digests.items():
                if was is None:
                    self._digests.pop(name, None)
                else:
                    self._digests[name] = was
            self._norms.restore(undo.norms)
            self._generation += 1
            self._applied, self._lineage = undo.before.version, undo.before.lineage
            self._manifest_digest = undo.before.digest
            self._undo = None
            if rejection is not None:
                self._rejections[undo.version] = rejection
                self._last_rejection = rejection.error
            self._decided.notify_all()

    def record_rejection(self, version: int, rejection: Rejection) -> None:
        with self._lock:
            self._rejections[version] = rejection
            self._last_rejection = rejection.error
            self._decided.notify_all()
