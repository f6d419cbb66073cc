"""From a source to manifest entries whose bytes are in Redis.

``hash_entries`` reads one tensor at a time and makes its entry (head's
entry reused when the bytes are equal, the digest found by fingerprint when
this publisher saw the bytes before); ``upload_missing`` writes the blobs
Redis lacks, measures each new tensor while it uploads and fingerprints it
again after; ``with_stats`` fills in the statistics before the commit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from hotswap import codec
from hotswap.errors import IntegrityError, NotFound, SourceError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import plan
from publisher.fingerprint import Fingerprint, Fingerprints, fingerprint
from publisher.reports import Progress
from publisher.sources import TensorSource

Content = tuple[str, str]
"""(digest, dtype): what a tensor's statistics depend on."""


def _view_key(t: torch.Tensor) -> tuple[object, ...]:
    """Identity of a tensor's bytes: two names with this key are the same memory."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.dtype,
        tuple(t.shape),
        tuple(t.stride()),
    )


@dataclass
class Hashed:
    """What ``hash_entries`` found: one entry per name, and what is still to do."""

    entries: list[TensorEntry]
    # Contents whose statistics are still to come (NaN until ``with_stats``).
    pending: set[Content]
    # The fingerprint each digest's bytes had when they were read: an upload
    # of them must leave the same fingerprint behind.
    fingerprints: dict[str, Fingerprint]


def hash_entries(
    src: TensorSource,
    names: Sequence[str],
    head: Manifest | None,
    settings: HotswapSettings,
    *,
    progress: Progress | None,
    memo: Fingerprints,
) -> Hashed:
    """One entry per name, reading one tensor at a time; head entries reused when equal.

    Each tensor is fingerprinted first; bytes ``memo`` knows by fingerprint
    are not hashed again (a scan of a state dict where little changed costs
    one xxh3 pass). Bytes that are hashed and turn out to be head's are
    fingerprinted again to learn them. New content gets its statistics
    later (``with_stats``): they are computed while that tensor uploads.
    """
    old = head.by_name() if head else {}
    chunk_of = {e.digest: e.chunk_bytes for e in old.values()}
    seen: dict[tuple[object, ...], TensorEntry] = {}
    out: list[TensorEntry] = []
    pending: set[Content] = set()
    prints: dict[str, Fingerprint] = {}
    done = 0
    total = sum(src.size(n) for n in names) if progress else 0
    for name in names:
        tensor = src.load(name)
        view = _view_key(tensor) if src.stable else None
        entry = seen.get(view) if view else None
        if entry is None:
            buf = codec.as_bytes(tensor)
            if len(buf) > settings.max_tensor_bytes:
                raise SourceError(
                    f"{src.where}: tensor {name!r} is {len(buf)} bytes, over the limit of "
                    f"{settings.max_tensor_bytes} (HOTSWAP_MAX_TENSOR_BYTES)"
                )
            fp = fingerprint(buf)
            digest = memo.digest_of(fp)
            hashed = digest is None
            if digest is None:
                digest = codec.digest(buf)
            prints[digest] = fp
            dtype = codec.dtype_name(tensor.dtype)
            shape = tuple(int(d) for d in tensor.shape)
            prev = old.get(name)
            if prev is not None and (prev.digest, prev.dtype, prev.shape) == (
                digest,
                dtype,
                shape,
            ):
                entry = prev
                # Head's bytes will not be uploaded: read them once more to learn
                # them (a tensor written to meanwhile is not learned).
                if hashed and fingerprint(buf) == fp:
                    memo.learn(fp, digest)
            else:
                chunk = chunk_of.get(digest, settings.chunk_bytes)
                entry = TensorEntry(name, dtype, shape, len(buf), digest, chunk, math.nan, math.nan)
                pending.add((digest, dtype))
            if view:
                seen[view] = entry
            del buf
        out.append(entry if entry.name == name else replace(entry, name=name))
        done += entry.nbytes
        del tensor
        if progress:
            progress("hash", done, total)
    return Hashed(out, pending, prints)


def upload_missing(
    store: Store,
    src: TensorSource,
    entries: Sequence[TensorEntry],
    stored: Sequence[TensorEntry],
    *,
    pending: set[Content],
    progress: Progress | None,
    prints: dict[str, Fingerprint],
    memo: Fingerprints,
) -> tuple[int, dict[Content, codec.Stats]]:
    """Upload every blob of ``entries`` Redis lacks: (bytes sent, statistics).

    The statistics of an uploaded tensor whose content is ``pending`` are
    computed in a thread while its bytes upload (the upload waits on the
    Redis server, so the client's core has time: a 512 MiB publish took
    0.80-0.86 s instead of 1.0 s).

    ``stored`` are entries whose blobs should be in Redis (the parent's):
    checked together, and one by one only if one of them is gone.

    Blobs the parent does not reference are touched before the check so
    that a concurrent gc's grace period covers them, and checked again
    after the upload in case a gc deleted one meanwhile. The parent's own
    blobs are checked once, together: gc keeps head's blobs, and the
    parent stays head until the commit (or the commit conflicts).

    Each uploaded tensor is fingerprinted again *after* its upload, in a
    thread while the next one uploads, and must still match the fingerprint
    it had before it was hashed (``prints``): no source is immutable (a
    state dict is the caller's live memory, a safetensors file is mapped
    and shows in-place writes), and a tensor that changed between the two
    reads leaves its blob deleted and the publish refused instead of a
    manifest that lies. One that did not is learned by ``memo``.
    """
    readable = set(src.names)
    # Any name of ours whose bytes make the blob (inherited names cannot be read).
    name_of = {e.digest: e.name for e in entries if e.name in readable}
    sent = 0
    stats: dict[Content, Future[codec.Stats]] = {}
    known = {(e.digest, e.chunk_bytes) for e in stored}
    likely = [e for e in entries if (e.digest, e.chunk_bytes) in known]
    unsure = [e for e in entries if (e.digest, e.chunk_bytes) not in known]
    for _attempt in range(3):
        todo = plan.unique_blobs(store.blobs.missing(unsure, expect_present=likely, touch=True))
        likely = []
        if not todo:
            return sent, {c: f.result() for c, f in stats.items()}
        total = sum(e.nbytes for e in todo.values())
        done = 0
        changed: list[str] = []
        with ThreadPoolExecutor(1, thread_name_prefix="hotswap-verify") as pool:
            checking: _Check | None = None
            for entry in todo.values():
                if changed:
                    break
                name = name_of.get(entry.digest)
                if name is None:
                    raise NotFound(
                        f"model {store.model!r}: blobs of inherited tensor {entry.name!r} are "
                        "gone from Redis (collected or lost); publish the whole model again"
                    )
                tensor = src.load(name)
                content = (entry.digest, codec.dtype_name(tensor.dtype))
                if content in pending and content not in stats:
                    stats[content] = pool.submit(codec.stats, tensor)
                buf = codec.as_bytes(tensor)
                del tensor

                def tick(n: int, base: int = done, total: int = total) -> None:
                    if progress:
                        progress("upload", base + n, total)

                sent += store.blobs.upload(entry, buf, _accumulate(tick))
                done += entry.nbytes
                if checking is not None and not _still_same(store, checking, memo):
                    changed.append(checking.name)
                checking = _Check(name, entry, prints[entry.digest], pool.submit(fingerprint, buf))
                del buf
            if checking is not None and not _still_same(store, checking, memo):
                changed.append(checking.name)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise SourceError(
                f"{src.where}: tensor {changed[0]!r}{more} changed while it was being "
                "published; publish again once it is stable"
            )
    raise IntegrityError(
        f"model {store.model!r}: uploaded blobs keep disappearing (a gc with "
        "HOTSWAP_GC_GRACE_SECONDS=0 running?); publish again"
    )


def _still_same(store: Store, check: _Check, memo: Fingerprints) -> bool:
    """Wait for one upload's second fingerprint; on a change, delete the blob it made."""
    if check.after.result() == check.before:
        memo.learn(check.before, check.entry.digest)
        return True
    # Its chunks hold bytes that do not hash to the name they are stored under.
    store.blobs.delete_blobs([plan.blob_of(check.entry)])
    return False


def with_stats(
    src: TensorSource,
    entries: Sequence[TensorEntry],
    pending: set[Content],
    known: dict[Content, codec.Stats],
) -> list[TensorEntry]:
    """``entries`` with the statistics of every ``pending`` content filled in.

    Content that was not uploaded (its blob was in Redis already) is read
    and measured here.
    """
    if not pending:
        return list(entries)
    readable = set(src.names)
    stats = dict(known)
    for e in entries:
        content = (e.digest, e.dtype)
        if content in pending and content not in stats and e.name in readable:
            stats[content] = codec.stats(src.load(e.name))
    out = []
    for e in entries:
        s = stats.get((e.digest, e.dtype)) if (e.digest, e.dtype) in pending else None
        out.append(e if s is None else replace(e, norm=s.norm, max_abs=s.max_abs))
    return out


@dataclass(frozen=True)
class _Check:
    """An uploaded tensor whose bytes are being fingerprinted again."""

    name: str
    entry: TensorEntry
    # Its fingerprint before its digest was taken, and after the upload.
    before: Fingerprint
    after: Future[Fingerprint]


def _accumulate(tick: Callable[[int], None]) -> Callable[[int], None]:
    """Turn the store's per-batch byte deltas into a running total."""
    total = 0

    def step(n: int) -> None:
        nonlocal total
        total += n
        tick(total)

    return step
