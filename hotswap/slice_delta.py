"""A rank's slice of a tensor stored as a delta: only the frames its slice needs.

A delta's frame ``i`` turns chunk ``i`` of the base into chunk ``i`` of the
result (``hotswap.delta``). A rank whose live slice holds the base reads the
frames of the chunks that cover its slice and decodes each against the base
bytes it holds: the chunks inside its slice from the live tensor, the (at
most two) boundary chunks, which reach outside the slice, from its
``Halos``: the whole boundary chunks of the contents it read before, kept
when it read them (a slice read reads its covering chunks whole). Each
decoded chunk is checked against the manifest's chunk digest of the result,
which the manifest's signature covers: a wrong frame or a wrong base gives
a chunk that fails it.

Where that does not apply (no halo for the running content, a column slice,
a delta stored the other way round, no chunk digests) ``hotswap.slice_read``
rebuilds the whole tensor instead. Imports no Redis: frames come through the
``BlobStore`` passed in.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable

from hotswap import delta, keys
from hotswap.blobs import BlobStore, frame_caps
from hotswap.blobwrite import chunk_span
from hotswap.candidates import reads_backwards
from hotswap.entries import TensorEntry
from hotswap.errors import FormatError, IntegrityError
from hotswap.frames import Blobs
from hotswap.slice_check import check_chunk, verifiable
from hotswap.slices import Halos, Part

__all__ = ["Halos", "Live", "boundary", "decode_slice", "halo_for"]

Live = tuple[str, Callable[[], memoryview]]
"""(digest of the content the live slice is a part of, the live slice's bytes when called)."""


def boundary(full: TensorEntry, lo: int, hi: int, chunks: range) -> list[int]:
    """The chunks of ``chunks`` that reach outside the bytes ``lo:hi`` (at most two)."""
    edges = {chunks.start, chunks.stop - 1} if chunks else set()
    return sorted(i for i in edges if chunk_span(full, i)[0] < lo or chunk_span(full, i)[1] > hi)


def halo_for(
    reader: Blobs, full: TensorEntry, part: Part, live: Live | None, halos: Halos | None
) -> dict[int, bytes] | None:
    """The boundary chunks of the base the rank runs, when the slice can be decoded from
    its frames alone (see the module docstring); None when it cannot."""
    ref = full.delta
    if (
        ref is None
        or part.dim != 0
        or not verifiable(full)
        or not isinstance(reader, BlobStore)
        or live is None
        or live[0] != ref.base
        or reads_backwards(full) is not False
        or halos is None
    ):
        return None
    return halos.get(full.name, ref.base)


def decode_slice(
    reader: BlobStore,
    full: TensorEntry,
    chunks: range,
    buf: memoryview,
    *,
    lo: int,
    live: Live,
    halo: dict[int, bytes],
    where: str,
) -> int:
    """Decode chunks ``chunks`` of ``full`` into ``buf`` (the tensor's size) from their
    frames; the live slice's bytes start at byte ``lo``. Returns the frame bytes read.

    Raises:
        IntegrityError: a frame is missing or oversized, a boundary chunk is not in
            ``halo``, or a decoded chunk does not hash to its digest.
    """
    ref = full.delta
    assert ref is not None
    caps = frame_caps(full, chunks)
    names = keys.chunk_keys(
        reader.ns, reader.model, ref.blob, full.chunk_bytes, chunks.stop, first=chunks.start
    )
    space = memoryview(mmap.mmap(-1, sum(caps)))
    got = reader.call(
        f"reading the delta of tensor {full.name!r}",
        functools.partial(reader.get_capped, names, caps, space, len(names)),
    )
    held = live[1]()
    fetched = 0
    for i, (frame, length) in zip(chunks, got, strict=True):
        what = f"{where} tensor {full.name!r}: delta frame {i} of {full.chunks}"
        if frame is None:
            problem = "is missing from Redis" if length is None else f"is {length} bytes, too long"
            raise IntegrityError(f"{what} {problem}; publish again")
        fetched += len(frame)
        start, end = chunk_span(full, i)
        base = halo.get(i)
        if base is None:
            if start < lo or end - lo > len(held):
                raise IntegrityError(f"{what}: its base chunk is not held; publish again")
            base = bytes(held[start - lo : end - lo])
        try:
            # Checked below against the signed chunk digest, not the frame's own.
            delta.decode_frame(frame, base, buf[start:end], where=what, verify=False)
        except FormatError as e:  # a frame that does not decode is a corrupted one
            raise IntegrityError(f"{e}; publish again") from e
        check_chunk(full, i, buf[start:end], where)
    return fetched
