"""Which version the agent considers next, and from which manifest.

``Delivery`` asks for a look on a notice or a poll. A notice names a version
and may carry its manifest bytes: the agent starts from those (the fetch
begins without a round trip) until one notice lied, else reads the manifest
of the version named, else head's. Nothing is applied or refused on a
notice's word: the carried bytes are compared with the manifest Redis holds
(``confirm``) first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hotswap import notice
from hotswap.errors import FormatError, IntegrityError, NotFound
from hotswap.manifest import Manifest
from hotswap.settings import HotswapSettings
from hotswap.staging import Staged
from hotswap.store import Store

log = logging.getLogger("hotswap.agent")


class Unconfirmed(Exception):
    """The manifest a notice carried is not what Redis holds (``held``) for its version."""

    def __init__(self, held: bytes | None) -> None:
        super().__init__()
        self.held = held


class Lookout:
    """Turns notices and polls into manifests for the agent to consider.

    Args:
        store: reads head and manifests.
        settings: the signing keys manifests must verify with.
        running: the applied version and its lineage (None, None before the first).
        consider: stages ``m`` and applies or refuses it; given the bytes a notice
            carried, it calls ``confirm`` before either and lets ``Unconfirmed`` out.
        refuse: records a version whose manifest failed its checks.
        gone: head is missing from Redis.
        settle: a carried manifest was not confirmed and nothing changed.

    Used by the agent's thread only (``head`` is read by others).
    """

    def __init__(
        self,
        store: Store,
        settings: HotswapSettings,
        *,
        running: Callable[[], tuple[int | None, str | None]],
        consider: Callable[[Manifest, bytes | None], None],
        refuse: Callable[[int, IntegrityError], None],
        gone: Callable[[], None],
        settle: Callable[[], None],
    ) -> None:
        self.store, self.settings = store, settings
        self.running, self.consider, self.refuse = running, consider, refuse
        self.gone, self.settle = gone, settle
        # The head last seen in Redis.
        self.head: int | None = None
        self._checked_head: int | None = None
        # Whether to start from the manifest a notice carries (until one lies).
        self.use_carried = True

    def wanted(self, raw: bytes) -> tuple[bool, int | None, bytes | None]:
        """Whether a notice may announce something new, which version it names,
        and the manifest bytes it carries for it.

        A garbled notice: look at head anyway.
        """
        try:
            n = notice.decode(raw)
        except FormatError:
            return True, None, None
        if n.model != self.store.model:
            return False, None, None
        applied, lineage = self.running()
        if n.lineage == lineage and applied is not None and n.version <= applied:
            return False, None, None
        return True, n.version, n.manifest if self.use_carried else None

    def check(
        self, force: bool, announced: int | None = None, carried: bytes | None = None
    ) -> None:
        """Consider the version a notice ``announced`` (from the manifest it
        ``carried``, or one read), or else head's."""
        if announced is not None and carried is not None and self._carried(announced, carried):
            return
        if announced is not None:
            try:
                manifest = self.store.manifest(announced, self.settings.key_bytes())
            except NotFound:
                pass  # a forged notice, or collected already: head tells the truth
            except IntegrityError as e:
                self._checked_head = announced  # polls of the same head do not re-read it
                self.refuse(announced, e)
                return
            else:
                self.head = announced
                self._checked_head = announced
                self.consider(manifest, None)
                return
        head = self.store.head()
        self.head = head
        if head is None:
            if self._checked_head is not None or force:
                self._checked_head = None
                self.gone()
            return
        if head == self._checked_head and not force:
            return
        self._checked_head = head
        try:
            manifest = self.store.manifest(head, self.settings.key_bytes())
        except NotFound:
            self._checked_head = None  # collected between two reads; look again next poll
            return
        except IntegrityError as e:
            self.refuse(head, e)
            return
        self.consider(manifest, None)

    def confirm(self, m: Manifest, carried: bytes, staged: Staged) -> None:
        """Raise Unconfirmed (the staged tensors released) unless Redis holds
        ``carried`` as ``m``'s manifest: nothing is applied or refused on a
        notice's word."""
        try:
            held: bytes | None = self.store.manifest_bytes(m.version)
        except NotFound:
            held = None  # collected already, or never published
        if held != carried:
            staged.release()
            raise Unconfirmed(held)

    def _carried(self, version: int, carried: bytes) -> bool:
        """Consider ``version`` from the manifest bytes its notice carried; False
        when they are not to be relied on, and Redis's manifest must be read."""
        try:
            m = self.store.manifest(version, self.settings.key_bytes(), carried)
        except IntegrityError:
            return False  # garbled, forged or unsigned: what Redis holds decides
        lineage = self.running()[1]
        if lineage is not None and m.lineage != lineage:
            return False  # a new lineage is rare enough to read from Redis
        self.head = self._checked_head = version
        try:
            self.consider(m, carried)
        except Unconfirmed as e:
            if e.held is not None:
                self.use_carried = False
                log.warning(
                    "model %r: the notice for v%d carried a manifest that is not the one "
                    "Redis holds (a forged notice?); reading manifests from Redis from now on",
                    self.store.model,
                    version,
                )
            self.settle()
            return False
        return True
