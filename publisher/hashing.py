"""Manifest entries for a source's tensors, and their statistics.

``hash_entries`` reads one tensor at a time and makes its entry (head's
entry reused when the bytes are equal, the digest found by fingerprint when
this publisher saw the bytes before); ``with_stats`` fills in the
statistics (``upload`` measures or derives them while the bytes go) before
the commit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from hotswap import codec, slice_check
from hotswap.errors import SourceError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
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
    # Chunk digests head states for a content (a renamed or tied tensor reuses them).
    known_digests = {
        (e.digest, e.chunk_bytes): e.chunk_digests
        for e in old.values()
        if e.chunk_digests is not None
    }
    # HOTSWAP_DELTAS=0 is the switch for agents older than the publisher: their
    # manifests stay format 1, which chunk digests (format 3) would end.
    per_chunk = settings.deltas
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
            if (
                per_chunk
                and entry.chunk_digests is None
                and slice_check.worth(entry.nbytes, entry.chunk_bytes)
            ):
                found = known_digests.get((entry.digest, entry.chunk_bytes))
                if found is None:
                    found = slice_check.chunk_digests(buf, entry.chunk_bytes)
                    known_digests[(entry.digest, entry.chunk_bytes)] = found
                entry = replace(entry, chunk_digests=found)
            elif not per_chunk and entry.chunk_digests is not None:
                entry = replace(entry, chunk_digests=None)
            if view:
                seen[view] = entry
            del buf
        out.append(entry if entry.name == name else replace(entry, name=name))
        done += entry.nbytes
        del tensor
        if progress:
            progress("hash", done, total)
    return Hashed(out, pending, prints)


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
