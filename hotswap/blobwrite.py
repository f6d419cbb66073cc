"""Writing blobs: a tensor's full blob, or a delta's frames, batch by batch.

``BlobWriter`` adds to the blob index (``hotswap.blobindex``) the writes of
content: chunks cut at the entry's chunk size (a delta's frames, one per
chunk, vary in length), sent over the zero-copy path of
``hotswap.transport`` where it applies and over redis-py's pipelines
elsewhere, at most ``PIPELINE_BYTES`` a round trip. ``hotswap.blobs.BlobStore``
builds the reads on it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

from hotswap import keys, transport
from hotswap.blobindex import BlobIndex, stored_blobs
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry

# Bytes queued in one pipeline round trip: big enough to stream, small enough
# to bound the client's buffers.
PIPELINE_BYTES = 32 * 1024 * 1024


def chunk_span(entry: TensorEntry, i: int) -> tuple[int, int]:
    """Where chunk ``i`` of ``entry`` starts and ends in the tensor's bytes."""
    start = i * entry.chunk_bytes
    return start, min(start + entry.chunk_bytes, entry.nbytes)


def chunk_batches(entry: TensorEntry, chunks: range | None = None) -> Iterator[range]:
    """The chunk indices of ``entry`` (or of ``chunks``) in runs of at most ``PIPELINE_BYTES``."""
    chunks = range(entry.chunks) if chunks is None else chunks
    per_batch = max(1, PIPELINE_BYTES // entry.chunk_bytes)
    for start in range(chunks.start, chunks.stop, per_batch):
        yield range(start, min(start + per_batch, chunks.stop))


class BlobWriter(BlobIndex):
    """Blob writes for one model (see ``BlobStore``, which adds the reads)."""

    def _chunk_keys(self, entry: TensorEntry) -> list[str]:
        """Every chunk key of the entry's stored blobs (full, delta, or both)."""
        return [
            k
            for name in stored_blobs(entry)
            for k in keys.chunk_keys(self.ns, self.model, name, entry.chunk_bytes, entry.chunks)
        ]

    @functools.cached_property
    def _blob_io(self) -> transport.ChunkIO | None:
        """The zero-copy chunk path (hotswap.transport), None where only redis-py's applies."""
        return transport.ChunkIO.of(self.client)

    def upload(
        self,
        entry: TensorEntry,
        data: memoryview,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write a tensor's full blob (idempotent: the keys are its content).

        Args:
            entry: the tensor's manifest entry (digest, size, chunk size).
            data: the tensor's bytes, exactly ``entry.nbytes`` long.
            progress: called with the bytes of each batch once it is stored.

        Returns:
            The bytes sent.

        Raises:
            IntegrityError: ``data`` is not ``entry.nbytes`` long.
            StoreUnavailable: Redis could not be reached.
        """
        names, values = self.blob_writes(entry, data)
        return self._send(entry, names, values, progress)

    def upload_frames(
        self,
        entry: TensorEntry,
        frames: Sequence[bytes],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write a delta's frames as the chunks of its delta blob (``entry.delta.blob``).

        Frame ``i`` is chunk ``i`` (``hotswap.delta``); frames vary in length,
        batched as the chunks of a full blob are.

        Args:
            entry: the tensor's manifest entry, with its ``DeltaRef``.
            frames: one per chunk of the entry, adding up to ``stored_bytes``.
            progress: called with the bytes of each batch once it is stored.

        Returns:
            The bytes sent.

        Raises:
            IntegrityError: no ``DeltaRef``, or frames that do not match it.
            StoreUnavailable: Redis could not be reached.
        """
        names, values = self.frame_writes(entry, frames)
        return self._send(entry, names, values, progress)

    def blob_writes(
        self, entry: TensorEntry, data: memoryview
    ) -> tuple[list[str], list[memoryview]]:
        """The chunk keys and values of ``entry``'s full blob of ``data`` (for ``write_many``).

        Raises:
            IntegrityError: ``data`` is not ``entry.nbytes`` long.
        """
        if len(data) != entry.nbytes:
            raise IntegrityError(
                f"tensor {entry.name!r}: {len(data)} bytes to upload, manifest says {entry.nbytes}"
            )
        names = keys.chunk_keys(self.ns, self.model, entry.digest, entry.chunk_bytes, entry.chunks)
        return names, [data[slice(*chunk_span(entry, i))] for i in range(entry.chunks)]

    def frame_writes(
        self, entry: TensorEntry, frames: Sequence[bytes]
    ) -> tuple[list[str], list[memoryview]]:
        """The chunk keys and values of ``entry``'s delta blob of ``frames`` (for ``write_many``).

        Raises:
            IntegrityError: no ``DeltaRef``, or frames that do not match it.
        """
        ref = entry.delta
        stored = sum(len(f) for f in frames)
        if ref is None or len(frames) != entry.chunks or stored != ref.stored_bytes:
            raise IntegrityError(
                f"tensor {entry.name!r}: {len(frames)} delta frames of {stored} bytes do not "
                f"match its entry ({entry.chunks} chunks, delta {ref and ref.stored_bytes} bytes)"
            )
        names = keys.chunk_keys(self.ns, self.model, ref.blob, entry.chunk_bytes, entry.chunks)
        return names, [memoryview(f) for f in frames]

    def write_many(self, names: Sequence[str], values: Sequence[memoryview], what: str) -> int:
        """SET each of ``names`` to its value, whatever blobs they are of, pipelined: a round
        trip carries up to ``PIPELINE_BYTES`` (one publish's small blobs and delta frames
        go together, not a round trip a tensor).

        Returns:
            The bytes sent.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        sent = start = size = 0
        for i, value in enumerate(values):
            size += len(value)
            if size >= PIPELINE_BYTES or i == len(values) - 1:
                batch = slice(start, i + 1)
                write = functools.partial(self._write, list(names[batch]), list(values[batch]))
                self.call(f"uploading {what}", write)
                sent, start, size = sent + size, i + 1, 0
        return sent

    def _send(
        self,
        entry: TensorEntry,
        names: list[str],
        values: list[memoryview],
        progress: Callable[[int], None] | None,
    ) -> int:
        """SET ``names`` to ``values`` (one per chunk of ``entry``), a batch per round trip."""
        sent = 0
        for batch in chunk_batches(entry):
            chunk = [values[i] for i in batch]
            write = functools.partial(self._write, [names[i] for i in batch], chunk)
            self.call(f"uploading tensor {entry.name!r}", write)
            done = sum(len(v) for v in chunk)
            sent += done
            if progress:
                progress(done)
        return sent

    def _write(self, names: list[str], values: list[memoryview]) -> None:
        fast = self._blob_io
        if fast is not None:
            with contextlib.suppress(*transport.REDIRECTED):
                fast.set_chunks(names, values)
                return
        pipe = self.client.pipeline(transaction=False)
        for name, value in zip(names, values, strict=True):
            pipe.set(name, value)
        pipe.execute()
