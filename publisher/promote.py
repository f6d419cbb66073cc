"""Versions that are not head: promoting one, and telling them from versions that were.

``Publisher.publish(..., promote=False)`` commits a version as any publish
does (blobs, manifest, log entry, its number, parent = head) but leaves head,
the signed head record and the notice alone: agents that follow head never
hear of it, and a rollout can put it on a few agents first. ``promote``
makes it head later, in one script, only while head is still the version's
parent; a publish or rollback since then moved head, and the version is
superseded (``VersionConflict``, naming the head). Promoting the head is a
no-op, so a rollout killed after its promote can run again.

``HeadChain`` answers which stored versions were head once (head's
ancestors along ``parent``), so that a rollback's default target passes over
a version that never was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hotswap import manifest as mf
from hotswap.errors import ConfigError, IntegrityError, NotFound
from hotswap.manifest import Manifest
from hotswap.store import Store
from publisher import commit
from publisher.plan import Head
from publisher.reports import author


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did: ``version`` is head, and was ``previous`` before (``moved``),
    or already was head (not ``moved``; nothing written)."""

    version: int
    previous: int | None
    moved: bool


def make_head(
    store: Store,
    version: int,
    *,
    message: str,
    keys: Sequence[bytes],
    expiry: float,
) -> Promotion:
    """Make stored ``version`` head, signed with ``keys[0]`` where keys are given (see
    ``Publisher.promote`` for the errors)."""
    if len(message) > mf.MAX_MESSAGE_LEN:
        raise ConfigError(f"message is {len(message)} characters, limit {mf.MAX_MESSAGE_LEN}")
    head, _, record = store.head_for_commit(None)
    if head == version:
        return Promotion(version, head, moved=False)
    data = store.manifest_bytes(version)
    # Agents with the signing keys would refuse a version that does not verify.
    m = store.manifest(version, keys, data)
    # The record is issued now, after the one Redis holds (a re-sign of the
    # parent may be newer than this manifest): agents refuse an older issue.
    issued = max(commit.now(), commit.not_before(Head(store.model, version, m), record, keys))
    notice, signed = commit.announcement(m, data, keys[0] if keys else None, expiry, issued)
    moved = store.promote(m, log_fields(m, message), notice, signed)
    return Promotion(version, head, moved)


def log_fields(m: Manifest, message: str) -> dict[str, str | int | float]:
    """The log entry of promoting ``m`` (``hotswap log``)."""
    return {
        "version": m.version,
        "kind": "promote",
        "author": author(),
        "created": commit.now(),
        "message": message,
        "parent": "" if m.parent is None else m.parent,
        "bytes_total": m.nbytes,
        "promoted": 1,
    }


class HeadChain:
    """Which stored versions were head once: head and its ancestors along ``parent``.

    Every commit that moves head names the head before it as its parent, so
    head's ancestors are exactly the versions that were head; a version
    published without promotion, and never promoted, is not among them.
    Ancestors are read lazily, newest first, each once. Where an ancestor's
    manifest is gone (collected) the chain below it is unknown, and a version
    there counts as having been head (the answer before versions could be
    stored without being head).

    Example::

        chain = HeadChain(store, store.head_manifest())
        chain.never_head(4)  # True: v4 was published with promote=False
    """

    def __init__(self, store: Store, head: Manifest | None) -> None:
        self._store = store
        self._known: set[int] = set()
        self._next: int | None = None
        # The oldest version known to have been head (none known: every version
        # is below it, and cannot be told).
        self._reached = math.inf
        self._lost = head is None
        if head is not None:
            self._known.add(head.version)
            self._reached, self._next = head.version, head.parent

    def never_head(self, version: int) -> bool:
        """Whether ``version`` surely never was head (False where it cannot be told)."""
        self._extend(version)
        if version in self._known:
            return False
        return version > self._reached or not self._lost

    def _extend(self, version: int) -> None:
        """Read ancestors until the chain reaches ``version`` or below."""
        while self._next is not None and self._next >= version and not self._lost:
            number = self._next
            self._known.add(number)
            self._reached = number
            try:
                # Only ``parent`` is read: whether it verifies is the caller's check.
                self._next = self._store.manifest(number).parent
            except (NotFound, IntegrityError):
                self._lost = True
