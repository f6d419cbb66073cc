"""The blobs a version's entries need, written to Redis.

``upload_missing`` writes the blobs Redis lacks (entries from
``hashing.hash_entries``), measures each new tensor while it uploads (or
derives a sparse delta's statistics from its frames) and fingerprints it
again after.

``upload_missing`` is one loop of rounds (check what Redis lacks, upload
it) over small named steps; the I/O is in that loop and in
``_Uploads.send``, the rest is pure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from hotswap import codec, keys
from hotswap.blobwrite import PIPELINE_BYTES
from hotswap.errors import IntegrityError, NotFound, SourceError
from hotswap.manifest import DeltaRef, TensorEntry
from hotswap.store import Store
from publisher import plan
from publisher.base import Encoder
from publisher.fingerprint import Fingerprint, Fingerprints, fingerprint
from publisher.hashing import Content, Hashed
from publisher.reports import Progress
from publisher.sources import TensorSource

# Full blobs up to this size join the publish's batch of chunks (a copy of
# their bytes) instead of a round trip each: a model's many small tensors
# (norms, biases) cost one round trip together.
SMALL_BLOB_BYTES = 64 * 1024

ATTEMPTS = 3
"""Rounds of check-then-upload before a publish gives up on blobs a gc keeps deleting."""


Refs = dict[tuple[str, int], DeltaRef | None]
"""How each content sent was stored, by (digest, chunk size): its delta, or None (full)."""


@dataclass(frozen=True)
class Uploaded:
    """What ``upload_missing`` did: bytes sent, statistics of new contents, how each was stored."""

    sent: int
    stats: dict[Content, codec.Stats]
    refs: Refs


def upload_missing(
    store: Store,
    src: TensorSource,
    entries: Sequence[TensorEntry],
    stored: Sequence[TensorEntry],
    *,
    hashed: Hashed,
    memo: Fingerprints,
    progress: Progress | None,
    encoder: Encoder | None = None,
) -> Uploaded:
    """Upload every blob of ``entries`` Redis lacks, as a delta where ``encoder`` finds one.

    ``stored`` are the entries whose blobs should be in Redis (the parent's).
    Why each round checks what it checks: docs/design.md, **Publish**.
    ``stored_as`` applies the result's ``refs`` to the entries.
    """
    likely, unsure = _split_by_parent(entries, stored)
    names = _readable_names(src, entries)
    uploads = _Uploads(store, src, names, hashed=hashed, memo=memo, progress=progress)
    uploads.encoder = encoder
    for _attempt in range(ATTEMPTS):
        # The parent's blobs are checked once (gc keeps head's, and the parent
        # stays head until the commit); the others are touched, so that a
        # concurrent gc spares them, and checked again after each round, as
        # the previous rounds stored them (full, delta, or both).
        current = stored_as(unsure, uploads.refs)
        todo = plan.unique_blobs(store.blobs.missing(current, expect_present=likely, touch=True))
        likely = []
        if not todo:
            # Contents that went as deltas alone were touched as full blobs first.
            refs = [uploads.refs.get((e.digest, e.chunk_bytes)) for e in unsure]
            alone = [e for e, r in zip(unsure, refs, strict=True) if r and not r.keyframe]
            if alone:
                store.blobs.unindex_absent(alone)
            return Uploaded(uploads.sent, uploads.statistics(), uploads.refs)
        uploads.send(todo)
    raise _keeps_disappearing(store.model)


def stored_as(entries: Sequence[TensorEntry], refs: Refs) -> list[TensorEntry]:
    """``entries`` with the contents this publish sent stored as it sent them."""
    return [
        replace(e, delta=refs[(e.digest, e.chunk_bytes)])
        if (e.digest, e.chunk_bytes) in refs
        else e
        for e in entries
    ]


class _Uploads:
    """One publish's uploads, with the statistics and second fingerprints taken beside them.

    No source is immutable (a state dict is the caller's live memory, a
    mapped file shows writes in place): bytes whose second fingerprint
    differs from their first leave their blob deleted and the publish
    refused, never a manifest that lies.
    """

    def __init__(
        self,
        store: Store,
        src: TensorSource,
        names: dict[str, str],
        *,
        hashed: Hashed,
        memo: Fingerprints,
        progress: Progress | None,
    ) -> None:
        self.store = store
        self.src = src
        self.names = names
        self.pending = hashed.pending
        self.prints = hashed.fingerprints
        self.memo = memo
        self.progress = progress
        self.sent = 0
        self.stats: dict[Content, Future[codec.Stats]] = {}
        self.encoder: Encoder | None = None
        self.refs: Refs = {}
        # Chunks (delta frames, small full blobs) waiting for the next round trip.
        self._names: list[str] = []
        self._values: list[memoryview] = []
        self._batched = 0
        # Base copies being made in the verify thread.
        self._learning: list[Future[None]] = []

    def send(self, todo: dict[str, TensorEntry]) -> None:
        """Upload ``todo``, fingerprinting each blob's bytes again while the next one uploads."""
        total = sum(e.nbytes for e in todo.values())
        done = 0
        changed: list[str] = []
        if self.encoder is not None:
            self.encoder.expect(todo.values())
        with ThreadPoolExecutor(1, thread_name_prefix="hotswap-verify") as pool:
            checking: _Check | None = None
            for entry in todo.values():
                if changed:
                    break
                name = _source_name(self.store.model, self.names, entry)
                tensor = self.src.load(name)
                measure = functools.partial(self._measure, pool, entry.digest, tensor)
                buf = codec.as_bytes(tensor)
                del tensor
                tick = _running_total(self.progress, done, total)
                written = self._store(entry, buf, tick, pool, measure)
                del measure
                done += entry.nbytes
                changed += self._settle(checking)
                before = self.prints[entry.digest]
                checking = _Check(name, entry, before, pool.submit(fingerprint, buf), written)
                del buf
            self._flush()
            changed += self._settle(checking)
        for learning in self._learning:
            learning.result()  # a copy that failed fails the publish
        self._learning.clear()
        if changed:
            raise _changed_while_published(self.src.where, changed)

    def _store(
        self,
        entry: TensorEntry,
        buf: memoryview,
        tick: Callable[[int], None],
        pool: ThreadPoolExecutor,
        measure: Callable[[], None],
    ) -> list[str]:
        """Upload ``entry``'s bytes as a delta, a full blob or both; the blob ids written.

        Its statistics come from the delta where its frames give them
        (``patchstats``), else ``measure`` starts them in the thread, before
        any upload, so that they are computed while the bytes go.

        A delta's frames (bytes of their own, not views of the source) join a
        batch that goes in one round trip with other tensors' frames
        (``_flush``); a full blob goes at once. The base copy for the next
        publish is made in ``pool``'s thread, before the bytes' second
        fingerprint there, so that fingerprint vouches for the copy too.
        A content sent again (a blob vanished since the last round) goes full:
        what a delta needs may be what vanished.
        """
        enc = self.encoder
        encoded = enc.encode(entry, buf) if enc is not None and entry.delta is None else None
        final = entry if encoded is None else replace(entry, delta=encoded.ref)
        content = (entry.digest, entry.dtype)
        if encoded is not None and encoded.stats is not None and content in self.pending:
            self.stats.setdefault(content, _known(encoded.stats))
        measure()
        written: list[str] = []
        blobs = self.store.blobs
        if encoded is not None and encoded.frames:
            self._queue(*blobs.frame_writes(final, encoded.frames))
            written.append(keys.blob_id(encoded.ref.blob, entry.chunk_bytes, entry.chunks))
        full = encoded is None or encoded.ref.keyframe
        if full and entry.nbytes <= SMALL_BLOB_BYTES:
            # A copy: the batch may go after these bytes' second fingerprint.
            self._queue(*blobs.blob_writes(final, memoryview(bytes(buf))))
        elif full:
            self.sent += blobs.upload(final, buf, tick)
        if full:
            written.append(plan.blob_of(final))
        if not full or entry.nbytes <= SMALL_BLOB_BYTES:
            tick(entry.nbytes)
        self.refs[(entry.digest, entry.chunk_bytes)] = None if encoded is None else encoded.ref
        if enc is not None:
            learning = enc.learn(entry, buf, None if encoded is None else encoded.digests, pool)
            if learning is not None:
                self._learning.append(learning)
            enc.done(entry)
        return written

    def _queue(self, names: list[str], values: list[memoryview]) -> None:
        """Add chunks to the batch, sending it once it holds a round trip's bytes."""
        self._names += names
        self._values += values
        self._batched += sum(len(v) for v in values)
        if self._batched >= PIPELINE_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Send the chunks batched so far (delta frames, small blobs), pipelined."""
        if self._names:
            what = f"{len(self._names)} chunks of small blobs and deltas"
            self.sent += self.store.blobs.write_many(self._names, self._values, what)
            self._names, self._values, self._batched = [], [], 0

    def _measure(self, pool: ThreadPoolExecutor, digest: str, tensor: torch.Tensor) -> None:
        """Start a new content's statistics in the thread, while its bytes upload."""
        # The upload mostly waits on the Redis server, leaving this core free
        # (docs/performance.md, change 11).
        content = (digest, codec.dtype_name(tensor.dtype))
        if content in self.pending and content not in self.stats:
            self.stats[content] = pool.submit(codec.stats, tensor)

    def _settle(self, check: _Check | None) -> list[str]:
        """Wait for an upload's second fingerprint: [] if its bytes held still, else its name."""
        if check is None:
            return []
        if check.after.result() == check.before:
            self.memo.learn(check.before, check.entry.digest)
            return []
        # Its chunks hold bytes that do not hash to the name they are stored under,
        # and the base may hold a torn copy of them. Queued frames go first, so
        # that none lands after the delete.
        self._flush()
        self.store.blobs.delete_blobs(check.written)
        if self.encoder is not None:
            self.encoder.forget(check.entry.digest)
        return [check.name]

    def statistics(self) -> dict[Content, codec.Stats]:
        """The statistics measured beside the uploads, by content."""
        return {content: future.result() for content, future in self.stats.items()}


def _known(stats: codec.Stats) -> Future[codec.Stats]:
    done: Future[codec.Stats] = Future()
    done.set_result(stats)
    return done


@dataclass(frozen=True)
class _Check:
    """An uploaded tensor whose bytes are being fingerprinted again."""

    name: str
    entry: TensorEntry
    # Its fingerprint before its digest was taken, and after the upload.
    before: Fingerprint
    after: Future[Fingerprint]
    # The blob ids its upload wrote (full, delta): deleted if the bytes moved.
    written: list[str]


def _split_by_parent(
    entries: Sequence[TensorEntry], stored: Sequence[TensorEntry]
) -> tuple[list[TensorEntry], list[TensorEntry]]:
    """The entries whose blobs ``stored`` has (likely in Redis), and the others."""
    known = {(e.digest, e.chunk_bytes) for e in stored}
    likely = [e for e in entries if (e.digest, e.chunk_bytes) in known]
    unsure = [e for e in entries if (e.digest, e.chunk_bytes) not in known]
    return likely, unsure


def _readable_names(src: TensorSource, entries: Sequence[TensorEntry]) -> dict[str, str]:
    """For each digest, a name of ours whose bytes ``src`` can load (inherited names cannot)."""
    readable = set(src.names)
    return {e.digest: e.name for e in entries if e.name in readable}


def _source_name(model: str, names: dict[str, str], entry: TensorEntry) -> str:
    """The name to load ``entry``'s bytes from; NotFound when no tensor of the source has them."""
    name = names.get(entry.digest)
    if name is None:
        raise NotFound(
            f"model {model!r}: blobs of inherited tensor {entry.name!r} are "
            "gone from Redis (collected or lost); publish the whole model again"
        )
    return name


def _running_total(progress: Progress | None, base: int, total: int) -> Callable[[int], None]:
    """The store's per-batch byte counts, reported as the upload phase's running total."""
    sent = 0

    def step(n: int) -> None:
        nonlocal sent
        sent += n
        if progress:
            progress("upload", base + sent, total)

    return step


def _changed_while_published(where: str, changed: Sequence[str]) -> SourceError:
    """The error for tensors whose bytes changed between their digest and their upload."""
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return SourceError(
        f"{where}: tensor {changed[0]!r}{more} changed while it was being "
        "published; publish again once it is stable"
    )


def _keeps_disappearing(model: str) -> IntegrityError:
    """The error when blobs are gone again after every round of uploads."""
    return IntegrityError(
        f"model {model!r}: uploaded blobs keep disappearing (a gc with "
        "HOTSWAP_GC_GRACE_SECONDS=0 running?); publish again"
    )
