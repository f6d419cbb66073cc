"""From a source, on top of head, to a new version's entries with their blobs in Redis.

``build`` is the middle of ``Publisher.publish``: hash the source's tensors
(``hashing.hash_entries``), inherit the rest for ``--only``, upload what Redis
lacks, as deltas where they pay (``publisher.base``), and fill in the
statistics. The commit is the publisher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from hotswap.errors import SourceError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import complete, hashing, plan, upload
from publisher.base import Base, Tally, encoder_for
from publisher.fingerprint import Fingerprints
from publisher.reports import Progress
from publisher.sources import TensorSource


@dataclass(frozen=True)
class Built:
    """A new version's entries, the bytes sent for them, and what its deltas did."""

    entries: list[TensorEntry]
    sent: int
    tally: Tally | None


def build(
    store: Store,
    src: TensorSource,
    names: Sequence[str],
    trusted: Manifest | None,
    settings: HotswapSettings,
    *,
    only: Sequence[str] | None,
    exclude: Sequence[str],
    progress: Progress | None,
    memo: Fingerprints,
    base: Base,
) -> Built:
    """The entries of ``src``'s tensors ``names`` on top of ``trusted`` (head, when trusted).

    Raises:
        SourceError: too many tensors, or one changed while it was published.
        NotFound: blobs of an inherited tensor are gone.
        StoreUnavailable: Redis could not be reached.
    """
    hashed = hashing.hash_entries(src, names, trusted, settings, progress=progress, memo=memo)
    fresh, pending = hashed.entries, hashed.pending
    if trusted and only is not None:
        entries = complete.kept_entries(plan.merge(trusted.tensors, fresh), exclude)
    else:
        entries = fresh
    if len(entries) > settings.max_tensors:
        raise SourceError(
            f"{src.where}: {len(entries)} tensors, over the limit of "
            f"{settings.max_tensors} (HOTSWAP_MAX_TENSORS)"
        )
    if not settings.deltas:  # agents may predate deltas: full blobs only
        mine = set(names)
        entries = [replace(e, delta=None) if e.name in mine else e for e in entries]
    stored = trusted.tensors if trusted else ()
    encoder = encoder_for(store, settings, trusted, entries, base)
    uploaded = upload.upload_missing(
        store,
        src,
        entries,
        stored,
        hashed=hashed,
        memo=memo,
        progress=progress,
        encoder=encoder,
    )
    sent = uploaded.sent
    entries = upload.stored_as(entries, uploaded.refs)
    entries = hashing.with_stats(src, entries, pending, uploaded.stats)
    return Built(entries, sent, encoder.tally if encoder is not None else None)
