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

# Valid versions a manual-mode agent keeps for ``apply_pending()``, newest last.
# More than one, so that the ranks of a group (``hotswap.group``) that stage at
# different speeds still hold a version in common while a fast publisher moves
# on; few, since each holds its changed tensors' bytes until applied or dropped.
KEEP_PENDING = 3


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
    (None when the manifest itself failed its checks) and the error ``wait_for`` raises;
    ``shared``: a group refused it because another rank did (``hotswap.group``)."""

    lineage: str | None
    error: ValidationError
    digest: str | None = None
    shared: bool = False


@dataclass(frozen=True)
class Ready:
    """A fetched, valid version waiting for ``apply_pending()``, and its manifest's digest."""

    staged: Staged
    digest: str

    @property
    def key(self) -> tuple[str, int, str]:
        """(lineage, version, manifest digest): what the ranks of a group agree on."""
        m = self.staged.plan.manifest
        return (m.lineage, m.version, self.digest)


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
        keep_pending: the most valid versions kept for ``apply_pending()``.
    """

    def __init__(
        self, policy: Policy, reporter: Reporter, keep_pending: int = KEEP_PENDING
    ) -> None:
        self._reporter = reporter
        self._keep_pending = max(1, keep_pending)
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
        # What ``wait_for`` answers from: the applied version once its callback ran
        # (``decided``), or what a revert put back. ``_applied`` flips under the
        # writer lock, before the callback: a waiter must not wake in between.
        self._announced: int | None = None
        self._lineage: str | None = None
        self._manifest_digest: str | None = None
        self._rejections: dict[int, Rejection] = {}
        self._last_rejection: ValidationError | None = None
        # Valid versions waiting for apply_pending(), newest last, all planned
        # against the same generation (an apply drops them all).
        self._pending: list[Ready] = []
        # An apply dropped pending versions newer than the one it applied: the
        # next poll looks at head in full and stages it again.
        self._relook = False
        # The version being staged now, and the pending versions kept beyond
        # keep_pending because another rank of a group holds or stages them
        # (``hotswap.group``): a slow rank's version is still here when it is ready.
        self._staging: tuple[str, int, str] | None = None
        self._protected: set[tuple[str, int, str]] = set()
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
        """The newest pending version (None: none waits)."""
        with self._lock:
            return self._pending[-1].staged.plan.manifest.version if self._pending else None

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def pending(self) -> list[tuple[str, int, str]]:
        """(lineage, version, manifest digest) of each pending version, newest last."""
        with self._lock:
            return [r.key for r in self._pending]

    def staging(self) -> tuple[str, int, str] | None:
        """(lineage, version, manifest digest) of the version being staged now."""
        with self._lock:
            return self._staging

    def local_rejections(self) -> list[tuple[str, int, str, Rejection]]:
        """This agent's own refusals of manifests at least as new as what runs (by number,
        any lineage): (lineage, version, digest, rejection), the ones a group must hear."""
        with self._lock:
            floor = self._applied or 0
            return [
                (r.lineage, v, r.digest, r)
                for v, r in sorted(self._rejections.items())
                if r.lineage is not None and r.digest is not None and not r.shared and v >= floor
            ]

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
            return any(r.digest == digest for r in self._pending)

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
                if self._announced is not None and self._announced >= version:
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

    def pend(
        self, ready: Ready, generation: int, stop: threading.Event | None = None
    ) -> list[Staged]:
        """Keep a valid version for ``apply_pending()`` unless one ran since it was planned.

        While an ``apply_pending()`` is under way (a group's may wait on its
        collectives), this waits for it to end instead of planning again in a loop.

        Returns:
            The versions to release: the oldest kept ones beyond ``keep_pending``,
            or ``ready.staged`` itself when it came too late (plan again).
        """
        with self._lock:
            while self._applying and not (stop is not None and stop.is_set()):
                self._stepped.wait(0.2)
            if self._applying or self._generation != generation:
                return [ready.staged]
            kept = [r for r in self._pending if r.digest != ready.digest]
            kept.append(ready)
            # The oldest beyond keep_pending go, but not one another rank needs.
            free = [r for r in kept if r.key not in self._protected]
            dropped = free[: max(0, len(free) - self._keep_pending)]
            self._pending = [r for r in kept if all(r is not d for d in dropped)]
            # With the pending version: whoever sees one sees the other.
            self._reporter.update(state="pending")
            return [r.staged for r in dropped]

    def rest(self, **fields: object) -> None:
        """Report the state between updates (pending if a version waits, else idle)."""
        with self._lock:
            self._reporter.update(state="pending" if self._pending else "idle", **fields)

    def take_pending(self) -> list[Staged]:
        """Remove every pending version (the caller releases them)."""
        with self._lock:
            taken, self._pending = self._pending, []
            return [r.staged for r in taken]

    def drop_pending(self, digest: str) -> Staged | None:
        """Remove the pending version of manifest ``digest`` (the caller releases it)."""
        with self._lock:
            found = [r for r in self._pending if r.digest == digest]
            self._pending = [r for r in self._pending if r.digest != digest]
            return found[0].staged if found else None

    def begin_apply_pending(self) -> bool:
        """Hold the pending versions still until ``end_apply_pending()``: none is added or
        dropped meanwhile, and one planned meanwhile waits, then is planned again.

        Returns:
            Whether one was already under way (then nothing is held; the caller stops).
        """
        with self._lock:
            if self._applying:
                return True
            self._applying = True
            return False

    def choose(self, digest: str | None) -> tuple[Ready | None, list[Staged]]:
        """Take the pending version of manifest ``digest`` (None: the newest) to apply, and
        every other one (planned against what runs now, so stale once it changes):
        the caller releases those. Dropping a newer one makes the next poll look at
        head in full."""
        with self._lock:
            found = [r for r in self._pending if digest is None or r.digest == digest]
            chosen = found[-1] if found else None
            if chosen is None:
                return None, []
            at = next(i for i, r in enumerate(self._pending) if r is chosen)
            newer, self._relook = self._pending[at + 1 :], bool(self._pending[at + 1 :])
            others = self._pending[:at] + newer
            self._pending = []
            return chosen, [r.staged for r in others]

    def end_apply_pending(self) -> None:
        with self._lock:
            self._applying = False
            self._stepped.notify_all()

    def staging_now(self, key: tuple[str, int, str] | None) -> None:
        """The version being staged now (None: none)."""
        with self._lock:
            self._staging = key

    def protect(self, keys: set[tuple[str, int, str]]) -> None:
        """Keep these pending versions beyond ``keep_pending`` (until the next call):
        the newest each rank of a group holds or stages."""
        with self._lock:
            self._protected = set(keys)

    def take_relook(self) -> bool:
        """Whether an apply dropped newer pending versions since this was last asked."""
        with self._lock:
            relook, self._relook = self._relook, False
            return relook

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
            self._announced = self._applied
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
            self._announced = self._applied
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
