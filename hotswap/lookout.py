"""Which manifest the agent considers next: the one a notice carried, the one it named, or head's.

``Lookout`` decides and reads; it never stages, applies or refuses. Its
answers are named results (``hotswap.looks``): a ``Candidate`` to consider, a
``Refused`` version whose manifest failed its checks, or a ``Quiet`` look. A
manifest a notice carried is only a head start: ``confirm`` compares it with
the one Redis holds before the agent acts on it.

With signing keys, head is the signed head record's (``hotswap.signedlook``
reads it, ``hotswap.freshness`` judges it), never the plain ``head`` key nor a
notice's version: the agent considers only the manifest a fresh, valid record
names, and a refused record is not read again until its bytes change.
"""

from __future__ import annotations

import logging
import threading

from hotswap import codec, notice
from hotswap.delivery import FOLLOW, Reason, Request
from hotswap.errors import FormatError, IntegrityError, NotFound
from hotswap.freshness import SignedHeads
from hotswap.looks import Candidate, Confirmation, Look, Quiet, Refused
from hotswap.manifest import Manifest
from hotswap.pins import STABLE, Pin
from hotswap.refusals import EDGE, Refusals
from hotswap.runstate import Running
from hotswap.settings import HotswapSettings
from hotswap.signedlook import SignedLook
from hotswap.store import Store

log = logging.getLogger("hotswap.agent")


class Lookout:
    """Turns requests into manifests for the agent to consider.

    Args:
        store: reads head and manifests.
        settings: the signing keys manifests must verify with.

    Used by the agent's thread; ``head`` is also read by others (under a lock).
    """

    def __init__(
        self, store: Store, settings: HotswapSettings, agent_id: str = "-", track: str = STABLE
    ) -> None:
        self.store, self.settings = store, settings
        # Without signing keys, a rollout's pin for this agent or its track
        # (``hotswap.pins``) decides instead of head while head is its base.
        self.agent_id, self.track = agent_id, track
        keys = settings.key_bytes()
        # With signing keys the signed head record decides, never the plain key.
        heads = SignedHeads(store.model, keys, settings.head_require_expiry)
        self.signed = SignedLook(store, heads, self._saw_head) if keys else None
        self._lock = threading.Lock()
        # Guarded by _lock: the head last seen in Redis (or named by a notice
        # whose manifest was read).
        self._head: int | None = None
        # Guarded by _lock: whether head was read at all (``head`` None then
        # means that no version is published).
        self._looked = False
        # Guarded by _lock: the pin followed at the last look (None: head).
        self._pin: Pin | None = None
        # The agent's thread only: the head whose manifest was last looked at,
        # so that a poll of an unchanged head reads nothing more.
        self._checked_head: int | None = None
        # Whether to start from the manifest a notice carries (until one lies).
        self.use_carried = True
        # The agent's thread only: manifests refused for their bytes, not read
        # again while Redis holds the same ones.
        self._refusals = Refusals()

    @property
    def head(self) -> int | None:
        """The head last seen in Redis."""
        with self._lock:
            return self._head

    @property
    def pin(self) -> Pin | None:
        """The rollout pin this agent followed at its last look (None: it follows head)."""
        with self._lock:
            return self._pin

    @property
    def looked(self) -> bool:
        """Whether head was read from Redis (or named by a notice) at least once."""
        with self._lock:
            return self._looked

    def _saw_head(self, head: int | None) -> None:
        with self._lock:
            self._head, self._looked = head, True

    def _saw_commit(self, version: int) -> None:
        """A notice named ``version`` and Redis holds it: a commit or promotion moved head
        to it, which ends every pin (their base is no longer head)."""
        with self._lock:
            self._head, self._looked, self._pin = version, True, None

    def wanted(self, raw: bytes, running: Running) -> Request | None:
        """The request a raw notice makes: None if it is another model's or carries
        the very manifest that runs; a look at head if it is garbled or names a
        version no newer than what runs (after Redis was restored from an older
        snapshot, that number may name other content: head decides)."""
        if notice.is_look(raw, self.store.model):
            return FOLLOW  # a rollout moved pins: look at what this agent follows
        try:
            n = notice.decode(raw)
        except FormatError:
            return Request(Reason.NOTICE)
        if n.model != self.store.model:
            return None

        if running.covers(n.version, n.lineage):
            if n.manifest is not None and codec.digest(n.manifest) == running.digest:
                # The version a pin ran became head (a promotion): look, so the pin ends.
                return FOLLOW if self.pin is not None else None
            return Request(Reason.NOTICE)
        return Request(Reason.NOTICE, n.version, n.manifest if self.use_carried else None)

    def carried(self, request: Request, running: Running) -> Candidate | None:
        """The manifest the request's notice carried, when it may be relied on for a
        head start; None sends the agent to Redis's manifest (``look``)."""
        if request.version is None or request.carried is None:
            return None
        try:
            m = self.store.manifest(request.version, self.settings.key_bytes(), request.carried)
        except IntegrityError:
            return None  # garbled, forged or unsigned: what Redis holds decides
        if running.lineage is not None and m.lineage != running.lineage:
            return None  # a new lineage is rare enough to read from Redis
        if self.signed is not None and (
            self._signed_names(m, request.carried) is not Confirmation.CONFIRMED
        ):
            # Not a byte fetched on a notice no signed head backs (a replayed
            # notice would otherwise cost a fetch each time it is sent).
            return None
        self._saw_commit(request.version)
        self._checked_head = request.version
        return Candidate(m, codec.digest(request.carried), request.carried)

    def confirm(self, m: Manifest, carried: bytes) -> Confirmation:
        """Whether Redis holds ``carried`` as ``m``'s manifest: nothing is applied or
        refused on a notice's word. A notice that lied turns carried manifests off.
        With signing keys, a fresh signed head must name those very bytes too."""
        if self.signed is not None:
            named = self._signed_names(m, carried)
            if named is not Confirmation.CONFIRMED:
                return named
        try:
            held: bytes | None = self.store.manifest_bytes(m.version)
        except NotFound:
            held = None  # collected already, or never published
        if held == carried:
            return Confirmation.CONFIRMED
        if held is None:
            return Confirmation.NOT_HELD
        self.use_carried = False
        log.warning(
            "model %r: the notice for v%d carried a manifest that is not the one "
            "Redis holds (a forged notice?); reading manifests from Redis from now on",
            self.store.model,
            m.version,
        )
        return Confirmation.CONTRADICTED

    def _signed_names(self, m: Manifest, carried: bytes) -> Confirmation:
        """Whether a fresh signed head names ``carried`` as ``m``; one naming other bytes
        for that version turns carried manifests off, as a lie about Redis does."""
        assert self.signed is not None
        named = self.signed.names(m, carried)
        if named is not Confirmation.CONTRADICTED:
            return named
        self.use_carried = False
        log.warning(
            "model %r: the notice for v%d carried a manifest that is not the one "
            "the signed head names (a forged or replayed notice?); reading manifests "
            "from Redis from now on",
            self.store.model,
            m.version,
        )
        return Confirmation.CONTRADICTED

    def look(self, request: Request, running: Running | None = None) -> Look:
        """Read the manifest of the version the request names, or else head's.

        With signing keys, the signed head's (a notice's version is a hint);
        ``running`` spares reading the manifest the record names when it runs.
        """
        if self.signed is not None:
            return self.signed.look(request.force, running or Running())
        if request.version is not None:
            if self._still_refused(request.version):
                return Quiet.NOTHING_NEW
            try:
                candidate = self._read(request.version)
            except NotFound:
                pass  # a forged notice, or collected already: head tells the truth
            except IntegrityError as e:
                self._checked_head = request.version  # polls of the same head do not re-read it
                return Refused(request.version, e)
            else:
                self._saw_commit(request.version)
                self._checked_head = request.version
                return candidate
        return self._look_at_head(request.force)

    def _following(self) -> int | None:
        """The version this agent follows: head, or the rollout pin that holds for it."""
        found = self.store.following(self.agent_id, self.track)
        with self._lock:
            self._pin = found.pin
        return found.version

    def still_followed(self, version: int) -> bool:
        """Whether this agent still follows ``version`` if a pin led it there: one read
        of head and pins just before the apply, so that a pin a rollout took back while
        the version was fetched is not applied (and reverted) after all."""
        with self._lock:
            pin = self._pin
        if pin is None or pin.version != version:
            return True
        return self._following() == version

    def _read(self, version: int, head: bool = False) -> Candidate:
        """Read, decode and (with keys) verify a manifest; its digest is of the wire bytes."""
        data = self.store.manifest_bytes(version)
        try:
            manifest = self.store.manifest(version, self.settings.key_bytes(), data)
        except IntegrityError:
            self._refusals.remember(version, data)
            raise
        self._refusals.forget(version)
        return Candidate(manifest, codec.digest(data), head=head)

    def _still_refused(self, version: int) -> bool:
        """Whether ``version``'s manifest was refused and Redis still holds those
        bytes: one glance at its length and ends instead of reading it again."""
        if version not in self._refusals:
            return False
        _head, glance = self.store.head_and_glance(version, EDGE)
        return self._refusals.unchanged(version, glance)

    def _look_at_head(self, force: bool) -> Look:
        refused = self._checked_head if force and self._checked_head in self._refusals else None
        if refused is None:
            head = self._following()
        else:
            # A full look at a head refused before: a glance tells whether it
            # changed, so a flood of notices does not read it again each time.
            head, glance = self.store.head_and_glance(refused, EDGE)
            if head == refused and self._refusals.unchanged(refused, glance):
                self._saw_head(head)
                return Quiet.NOTHING_NEW
            head = self._following()
        self._saw_head(head)
        if head is None:
            if self._checked_head is not None or force:
                self._checked_head = None
                return Quiet.HEAD_GONE
            return Quiet.NOTHING_NEW
        if head == self._checked_head and not force:
            return Quiet.NOTHING_NEW
        self._checked_head = head
        try:
            return self._read(head, head=True)
        except NotFound:
            self._checked_head = None  # collected between two reads; look again next poll
            return Quiet.NOTHING_NEW
        except IntegrityError as e:
            return Refused(head, e)
