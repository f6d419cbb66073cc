"""The head a commit builds on: read once for the commit's compare-and-set."""

from __future__ import annotations

from collections.abc import Sequence

from hotswap import manifest as mf
from hotswap.errors import IntegrityError, NotFound
from hotswap.store import Store
from publisher.plan import Head


def read(store: Store, keys: Sequence[bytes], guess: int | None) -> tuple[Head, bytes | None]:
    """The head's number and, if it verifies (with the signing ``keys``), its manifest;
    and the signed head record's bytes (None where absent). ``guess``: the version
    this process last committed (read with head in one round trip when it still is)."""
    number, data, record = store.head_for_commit(guess)
    signing = bool(keys)
    if number is None:
        return Head(store.model, None, signing=signing), record
    try:
        manifest = store.manifest(number, keys, data)
        return Head(store.model, number, manifest, None, signing), record
    except (IntegrityError, NotFound) as e:
        # Unsigned (signing just turned on), forged, garbled or missing: a full
        # publish may still go on top of it, taking nothing from it but its number.
        return Head(store.model, number, None, e, signing), record


def lineage(store: Store, head: Head) -> str:
    """The lineage of a new version whose parent's manifest is not trusted (or absent).

    An unsigned or forged manifest that still decodes lends its lineage: a
    lineage only tells agents whether version numbers are comparable (a
    wrong one makes them compare digests instead), and keeping it spares
    them a false "Redis lost its data" when signing is first turned on.
    """
    if head.number is None:
        return mf.new_lineage()
    try:
        return store.manifest(head.number).lineage
    except (IntegrityError, NotFound):
        return mf.new_lineage()
