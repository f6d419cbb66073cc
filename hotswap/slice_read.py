"""Reading a rank's slice of a published tensor: the chunks that cover it, each verified.

Imports no Redis (the blob reader is passed in). For a ``SliceEntry``:

1. the byte range the slice spans in the published tensor's row-major bytes
   (one contiguous range for a slice along dimension 0; from its first to its
   last element otherwise, which for a column slice is nearly every byte);
2. the chunks that cover that range are read whole (``BlobStore.read_chunks``)
   into a buffer of the tensor's size whose other pages are never touched;
3. each chunk read is checked against its digest in the manifest
   (``slice_check``): a part of a chunk could not be, so the boundary chunks
   cost at most two chunks more than the slice itself;
4. the slice is copied out of that buffer into the staging buffer.

Falls back to reading every chunk and checking the whole digest when the
entry states no chunk digests (manifests of older publishers, tensors of one
chunk) or the reader cannot read a run of chunks; a tensor stored only as a
delta is reconstructed whole by the caller (``whole``) and then sliced.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Callable, MutableMapping
from typing import Protocol

import torch

from hotswap import codec, dtypes, slice_check, slice_delta
from hotswap.blobwrite import chunk_span
from hotswap.candidates import History
from hotswap.entries import TensorEntry
from hotswap.frames import Blobs
from hotswap.manifest import Manifest
from hotswap.reconstruct import Rebuild
from hotswap.slice_check import check_chunk
from hotswap.slice_delta import Live
from hotswap.slices import Part, SliceEntry, unsliced


class RangeBlobs(Protocol):
    """A reader of a run of a blob's chunks (``BlobStore.read_chunks``)."""

    def read_chunks(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None: ...


def byte_range(full: TensorEntry, part: Part) -> tuple[int, int]:
    """Where ``part`` starts and ends (exclusive) in ``full``'s row-major bytes.

    Example:
        >>> e = TensorEntry("w", "F32", (4, 3), 48, "0" * 64, 4096, 0.0, 0.0)
        >>> byte_range(e, Part(0, 1, 3)), byte_range(e, Part(1, 1, 2))
        ((12, 36), (4, 44))
    """
    shape, itemsize = full.shape, dtypes.DTYPES[full.dtype].itemsize
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    first = part.start * strides[part.dim]
    last = sum(
        (part.stop - 1 if d == part.dim else n - 1) * strides[d] for d, n in enumerate(shape)
    )
    return first * itemsize, (last + 1) * itemsize


def covering(full: TensorEntry, part: Part) -> range:
    """The chunks of ``full`` that hold a byte of ``part``."""
    lo, hi = byte_range(full, part)
    return range(lo // full.chunk_bytes, -(-hi // full.chunk_bytes))


def _verifiable(reader: Blobs, full: TensorEntry) -> bool:
    return slice_check.verifiable(full) and hasattr(reader, "read_chunks")


def read_slice(
    reader: Blobs,
    entry: SliceEntry,
    out: memoryview,
    *,
    version: int,
    where: str,
    whole: Callable[[memoryview], int],
    live: Live | None = None,
) -> int:
    """Fill ``out`` (``entry.nbytes``) with the verified bytes of the slice; the bytes read.

    ``whole(buf)`` fills ``buf`` with the published tensor's verified bytes
    (a delta's reconstruction) and returns the bytes it read; it runs only
    for a tensor that has no full blob and whose frames cannot be decoded
    against what the rank holds (``slice_delta``; ``live``: what it runs).

    Raises:
        IntegrityError: a chunk is missing, of the wrong length, or does not
            hash to its digest (or, in the fallback, the whole digest fails).
    """
    full, part = entry.full, entry.part
    assert full is not None and part is not None
    if full.nbytes == 0:
        return 0
    # Anonymous memory: only the pages of the chunks read are ever touched.
    buf = memoryview(mmap.mmap(-1, full.nbytes))
    chunks = covering(full, part)
    lo, hi = byte_range(full, part)
    if full.delta is not None and not full.delta.keyframe:
        halo = slice_delta.halo_for(reader, full, part, live, entry.halos)
        if halo is not None and set(slice_delta.boundary(full, lo, hi, chunks)) <= set(halo):
            assert live is not None
            fetched = slice_delta.decode_slice(
                reader,  # type: ignore[arg-type]  # halo_for(): a BlobStore
                full,
                chunks,
                buf,
                lo=lo,
                live=live,
                halo=halo,
                where=where,
            )
        else:
            fetched = whole(buf)
    elif _verifiable(reader, full):
        start, stop = chunk_span(full, chunks.start)[0], chunk_span(full, chunks.stop - 1)[1]
        ranged: RangeBlobs = reader  # type: ignore[assignment]
        ranged.read_chunks(full, chunks, buf[start:stop], version)
        for i in chunks:
            check_chunk(full, i, buf[slice(*chunk_span(full, i))], where)
        fetched = stop - start
    else:
        hashing = codec.ChunkDigest(buf, full.chunk_bytes)
        reader.read_into(full, buf, version, hashing.landed)
        codec.check_hexdigest(full.name, hashing.hexdigest(), full.digest, where)
        fetched = full.nbytes
    if entry.halos is not None and part.dim == 0:
        # Every covering chunk is in ``buf`` and verified: keep the boundary ones for
        # the next delta of this content.
        edges = slice_delta.boundary(full, lo, hi, chunks)
        entry.halos.put(
            full.name, full.digest, {i: bytes(buf[slice(*chunk_span(full, i))]) for i in edges}
        )
    _copy_part(buf, full, part, out)
    return fetched


def _copy_part(buf: memoryview, full: TensorEntry, part: Part, out: memoryview) -> None:
    """Copy ``part`` of the tensor whose bytes are ``buf`` into ``out``, as bytes (no
    dtype kernels needed: the last dimension is counted in bytes)."""
    itemsize = dtypes.DTYPES[full.dtype].itemsize
    last = len(full.shape) - 1
    rows = (*full.shape[:last], full.shape[last] * itemsize)
    src = torch.frombuffer(buf, dtype=torch.uint8).view(rows)
    scale = itemsize if part.dim == last else 1
    piece = src.narrow(part.dim, part.start * scale, (part.stop - part.start) * scale)
    dst = torch.frombuffer(out, dtype=torch.uint8).view(piece.shape)
    dst.copy_(piece)


def fetch_slice(
    reader: Blobs,
    entry: SliceEntry,
    view: memoryview,
    m: Manifest,
    *,
    older: History,
    where: str,
    live: Live | None,
) -> int:
    """``read_slice`` for ``staging.fetch``: a tensor stored only as a delta whose frames
    cannot be decoded against the live slice (``slice_delta``) is rebuilt whole from
    full blobs and deltas, reading older manifests from ``older``. Returns the bytes read."""
    full = entry.full
    assert full is not None

    def whole(buf: memoryview) -> int:
        rebuild = Rebuild(reader, unsliced(m), full, history=older, where=where)
        rebuild.into(buf, None)
        return rebuild.fetched

    return read_slice(reader, entry, view, version=m.version, where=where, whole=whole, live=live)


def state_stats(
    changed: MutableMapping[str, TensorEntry], entry: SliceEntry, t: torch.Tensor
) -> None:
    """State the verified slice's own statistics in ``changed`` (a plan's): the manifest
    states the whole tensor's, which validation cannot compare with a slice. The bytes
    passed their chunk digests, so these describe exactly what the publisher published."""
    s = codec.stats(t)
    for name, e in changed.items():
        # Tied names share the staged bytes, each with an entry of its own.
        if isinstance(e, SliceEntry) and (e.digest, e.part) == (entry.digest, entry.part):
            changed[name] = dataclasses.replace(e, norm=s.norm, max_abs=s.max_abs)
