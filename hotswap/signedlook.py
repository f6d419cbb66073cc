"""The agent's reads of its model's signed head record, for agents with signing keys.

``hotswap.freshness`` says whether a record may be followed; this module reads
Redis through the ``Store`` and answers with ``hotswap.looks`` results. Every
look reads head and record in one round trip and follows the record, never the
plain ``head`` key nor a notice's version. In order: the record's signature,
its freshness (watermark, expiry), whether it names what runs (then nothing is
read, and a plain head it does not name is refused), the manifest it names
(signature, then its digest against the record: mixed metadata), a signed
newer manifest of its lineage (a replayed record), and only then a candidate.
A refused record is not read again, even on a notice, until it (or the plain
head) changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hotswap import codec
from hotswap.errors import IntegrityError, NotFound
from hotswap.freshness import SignedHeads
from hotswap.headrecord import HeadRecord
from hotswap.looks import SIGNED_HEAD, Candidate, Confirmation, Look, Quiet, Refused
from hotswap.manifest import Manifest
from hotswap.runstate import Running
from hotswap.store import Store


@dataclass(frozen=True)
class _Overtaken:
    """A signed head record, and a signed manifest of its lineage created after it."""

    record: HeadRecord
    following: Manifest


class SignedLook:
    """Looks at the signed head for one agent (its thread only).

    Args:
        store: reads head, the record and manifests.
        heads: the rules and the watermark (``hotswap.freshness``).
        saw_head: told the version head names, for ``Agent.head_version``.

    Example::

        signed = SignedLook(store, SignedHeads("m", keys), lambda v: None)
        look = signed.look(force=True, running=Running())
    """

    def __init__(
        self, store: Store, heads: SignedHeads, saw_head: Callable[[int | None], None]
    ) -> None:
        self.store, self.heads = store, heads
        self._saw_head = saw_head
        # The signed head last looked at (its bytes with the plain head), and
        # the last one refused, which is not read again until it changes.
        self._checked: bytes | None = None
        self._refused: bytes | None = None

    def look(self, force: bool, running: Running) -> Look:
        """The manifest a fresh, valid signed head names, or why it is refused.

        A plain head that no valid signed head names is refused too, once the
        signed head's manifest runs (and for its manifest's own failure, if it
        has one). Looks a second time only when a commit landed between reads.
        """
        for _ in range(2):
            head, data = self.store.head_and_record()
            if data is None and head is None:
                self._saw_head(None)
                if self._checked is not None or force:
                    self._checked = None
                    return Quiet.HEAD_GONE
                return Quiet.NOTHING_NEW
            seen = _seen(head, data)
            if seen == self._refused or (seen == self._checked and not force):
                return Quiet.NOTHING_NEW
            self._checked = seen
            look = self._follow(head, data, running)
            if isinstance(look, _Overtaken):
                # A signed newer manifest of the record's lineage: a commit landed
                # between the two reads (the record has changed: look again), or
                # the record is a replay (it has not).
                if self.store.head_and_record()[1] != data:
                    continue
                error = self.heads.replayed(look.record, look.following)
                look = Refused(look.record.version, error, SIGNED_HEAD)
            if isinstance(look, Refused):
                self._refused = seen
            return look
        self._checked = None  # head keeps moving: the next notice or poll looks again
        return Quiet.NOTHING_NEW

    def _follow(self, head: int | None, data: bytes | None, running: Running) -> Look | _Overtaken:
        """Check the record and read the manifest it names; ``_Overtaken`` when a
        newer signed manifest of its lineage exists (a race or a replay)."""
        signed = self.heads
        try:
            record = signed.decode(data, head)
        except IntegrityError as e:
            self._saw_head(head)
            if head is None:
                return Quiet.HEAD_GONE  # nothing to follow, nothing to refuse
            return self._unbacked(head, e) if data is None else Refused(head, e, SIGNED_HEAD)
        self._saw_head(record.version)
        try:
            signed.check_fresh(record, time.time())
        except IntegrityError as e:
            return Refused(record.version, e, SIGNED_HEAD)
        if record.manifest == running.digest:
            signed.accept(record)  # re-signed, or seen again: nothing to fetch
            if head is not None and head != record.version:
                return self._unbacked(head, signed.unbacked(head, record))
            return Quiet.NOTHING_NEW
        try:
            data = self.store.manifest_bytes(record.version)
            manifest = self.store.manifest(record.version, signed.keys, data)
        except NotFound:
            self._checked = None  # deleted by someone: look again next poll
            return Quiet.NOTHING_NEW
        except IntegrityError as e:
            return Refused(record.version, e)
        digest = codec.digest(data)
        try:
            signed.check_manifest(record, digest)
        except IntegrityError as e:
            return Refused(record.version, e, SIGNED_HEAD)
        following = self._following(record)
        if following is not None:
            return _Overtaken(record, following)
        signed.accept(record)
        return Candidate(manifest, digest, head=True)

    def _unbacked(self, head: int, error: IntegrityError) -> Refused:
        """Refuse a plain head no valid signed head names: for its manifest's own
        failure where it has one (unsigned, unknown key, altered), else ``error``."""
        try:
            self.store.manifest(head, self.heads.keys)
        except NotFound:
            pass
        except IntegrityError as e:
            return Refused(head, e)
        return Refused(head, error, SIGNED_HEAD)

    def _following(self, record: HeadRecord) -> Manifest | None:
        """The signed manifest after the record's, if it shows the record replayed."""
        try:
            following = self.store.manifest(record.version + 1, self.heads.keys)
        except (NotFound, IntegrityError):
            return None  # absent, or not signed by us: says nothing about the record
        return following if self.heads.newer(record, following) else None

    def names(self, m: Manifest, carried: bytes) -> Confirmation:
        """Whether a fresh signed head names ``carried`` as ``m``: CONTRADICTED when it
        names other bytes for that very version (the notice lied); anything else
        is left to ``look``, which reads the record again and refuses it if it must."""
        head, data = self.store.head_and_record()
        try:
            record = self.heads.decode(data, head)
            self.heads.check_fresh(record, time.time())
        except IntegrityError:
            return Confirmation.NOT_HELD
        if (record.version, record.lineage) != (m.version, m.lineage):
            return Confirmation.NOT_HELD  # head moved on, or never named it
        if record.manifest != codec.digest(carried):
            return Confirmation.CONTRADICTED
        if self._following(record) is not None:
            return Confirmation.NOT_HELD
        self.heads.accept(record)
        self._checked = _seen(head, data)
        return Confirmation.CONFIRMED


def _seen(head: int | None, data: bytes | None) -> bytes:
    """What identifies a look at the signed head: the record's bytes and the plain head."""
    return (data or b"") + f"|head {head}".encode()
