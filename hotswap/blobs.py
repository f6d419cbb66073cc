"""Blob I/O of one model: which chunks are missing, upload, read back, index, delete.

A tensor's bytes are stored by content: cut at the entry's chunk size, one
Redis string per chunk (``keys.blob_key``), and a sorted set indexes each blob
by when a publish last referenced it (gc's grace clock). Chunks travel over
the zero-copy path of ``hotswap.transport`` where it applies and over
redis-py's pipelines elsewhere; every operation runs under the one retry and
error policy (``connection.guarded``). This module does not import ``store``:
``Store.blobs`` is a ``BlobStore`` on the same client.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar, cast

from hotswap import keys, transport
from hotswap.blobindex import DELETE_BATCH, blob_ids, stored_blobs
from hotswap.blobwrite import PIPELINE_BYTES, BlobWriter, chunk_batches, chunk_span
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry
from hotswap.readchecks import check_chunk, checked_frames, frame_caps
from hotswap.replicas import ReplicaReads

T = TypeVar("T")
# Names that lived here before the blob index and writes moved out.
__all__ = [
    "DELETE_BATCH",
    "PIPELINE_BYTES",
    "STREAM_BYTES",
    "BlobStore",
    "blob_ids",
    "check_chunk",
    "checked_frames",
    "frame_caps",
    "stored_blobs",
]
# The buffer a streamed read (``BlobStore.stream``) reuses for each batch of chunks.
STREAM_BYTES = PIPELINE_BYTES


def _stored_as(entry: TensorEntry) -> tuple[tuple[str, ...], int, int]:
    return stored_blobs(entry), entry.chunk_bytes, entry.nbytes


def _count(entry: TensorEntry) -> int:
    """How many chunk keys the entry's stored blobs have."""
    return entry.chunks * len(stored_blobs(entry))


def _unique_blobs(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """One entry per way of storing a content (tied tensors share one), empty tensors left out."""
    unique = {_stored_as(e): e for e in entries if e.chunks}
    return list(unique.values())


class BlobStore(BlobWriter):
    """Blob (tensor content) I/O for one model under one namespace.

    Args:
        client: a ``redis.Redis`` or ``redis.cluster.RedisCluster``.
        model: the model's name.
        namespace: the key prefix shared by a deployment's models.
        retrying: the retry policy (default ``connection.operation_retry()``).

    Raises:
        ConfigError: the model or namespace name is not allowed in a key.

    Example::

        blobs = BlobStore(client, "m")  # or Store(client, "m").blobs
        if blobs.missing([entry]):
            blobs.upload(entry, codec.as_bytes(tensor))
        blobs.read_into(entry, memoryview(bytearray(entry.nbytes)))
    """

    # Replica reads of blob chunks (``hotswap.replicas``); None: primaries only.
    # ``Store.from_settings`` sets it from HOTSWAP_READ_FROM_REPLICAS.
    replicas: ReplicaReads | None = None

    # -- which blobs are stored -------------------------------------------------

    def missing(
        self,
        entries: Sequence[TensorEntry],
        *,
        expect_present: Sequence[TensorEntry] = (),
        touch: bool = False,
    ) -> list[TensorEntry]:
        """The entries (of both lists) with at least one chunk absent from Redis.

        An entry's chunks are those of every blob it is stored in
        (``stored_blobs``): its full blob, its delta blob, or both.

        Args:
            entries: checked blob by blob.
            expect_present: blobs believed stored, such as the parent version's:
                counted together in the same round trip, and looked at blob by
                blob only when that count falls short (one EXISTS over many
                keys is cheaper than one per blob; docs/performance.md,
                "Blob checks").
            touch: first mark the blobs of ``entries`` as referenced now (as
                ``touch_blobs`` does, so that a concurrent gc's grace period
                covers them), in the same round trip.

        Returns:
            The entries of ``entries`` then ``expect_present`` whose blob is
            incomplete, in that order.

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        todo, likely = _unique_blobs(entries), _unique_blobs(expect_present)
        likely_keys = [self._chunk_keys(e) for e in likely]

        def check() -> list[int]:
            groups = [self._chunk_keys(e) for e in todo]
            if likely_keys:
                groups.append([k for ks in likely_keys for k in ks])
            stamps = self._index_members(entries, None) if touch else None
            return self._per_group("EXISTS", groups, stamps)

        counts = self.call("checking blobs", check)
        gone = {
            _stored_as(e) for e, n in zip(todo, counts[: len(todo)], strict=True) if n != _count(e)
        }
        if likely and counts[-1] != sum(len(ks) for ks in likely_keys):
            each = self.call("checking blobs", lambda: self._per_group("EXISTS", likely_keys))
            gone |= {_stored_as(e) for e, n in zip(likely, each, strict=True) if n != _count(e)}
        return [e for e in (*entries, *expect_present) if _stored_as(e) in gone]

    # -- chunks out ------------------------------------------------------------

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """Read a tensor's chunks into ``out``; the digest check is the caller's.

        Args:
            entry: the tensor's manifest entry.
            out: exactly ``entry.nbytes`` long.
            version: the version read, named in error messages.
            on_chunk: ``on_chunk(i, length)`` runs once chunk ``i`` is in
                ``out`` (again for every chunk of a retried read).

        Raises:
            IntegrityError: ``out`` has the wrong length, or a chunk is
                missing or of the wrong length (names the tensor and chunk).
            StoreUnavailable: Redis could not be reached.

        Example::

            out = bytearray(entry.nbytes)
            store.blobs.read_into(entry, memoryview(out), version=7)
            codec.check_digest(entry.name, out, entry.digest, "model 'm' v7")
        """
        self.read_chunks(entry, range(entry.chunks), out, version, on_chunk)

    def read_chunks(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """``read_into`` for a run of chunks only (a rank's slice, ``hotswap.slice_read``):
        ``out`` holds exactly them, from where chunk ``chunks.start`` starts."""
        where = f"model {self.model!r}" + (f" v{version}" if version is not None else "")
        need = chunk_span(entry, chunks.stop - 1)[1] - chunk_span(entry, chunks.start)[0]
        need = need if chunks else 0
        if len(out) != need:
            raise IntegrityError(
                f"{where} tensor {entry.name!r}: buffer is {len(out)} bytes, need {need}"
            )
        self._read_chunks(entry, chunks, out, where, on_chunk)

    def stream(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """A tensor's bytes in order, a batch of chunks at a time, in one reused buffer.

        Memory stays at one batch (``STREAM_BYTES``, or one chunk where chunks
        are larger) whatever size the entry declares, and a missing chunk ends
        the read at its batch: the way to re-read a version whose manifest may
        lie (``hotswap verify``). Each view is overwritten by the next one.

        Args:
            entry: the tensor's manifest entry.
            version: the version read, named in error messages.

        Returns:
            An iterator of consecutive pieces of the tensor's bytes.

        Raises:
            IntegrityError: a chunk is missing or of the wrong length.
            StoreUnavailable: Redis could not be reached.

        Example::

            hasher = blake3.blake3()
            for piece in store.blobs.stream(entry, version=7):
                hasher.update(piece)
        """
        where = f"model {self.model!r}" + (f" v{version}" if version is not None else "")
        buf: memoryview | None = None
        for batch in chunk_batches(entry):
            base, stop = chunk_span(entry, batch.start)[0], chunk_span(entry, batch.stop - 1)[1]
            if buf is None:
                buf = memoryview(bytearray(stop - base))  # the first batch is the largest
            out = buf[: stop - base]
            # What Redis holds is what verify asks about: primaries only.
            self._read_chunks(entry, batch, out, where, None, replicas=False)
            yield out

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """The frames of ``entry``'s delta blob (``entry.delta``), in order, one at a time.

        A frame's length varies: each is refused past ``delta.max_frame_bytes``
        of its chunk, and their total must be the ``stored_bytes`` the manifest
        declares. Each batch of frames lands in a buffer of its own (reserved,
        not touched: pages fill only as short frames land), so a view stays
        valid while it is held (a frame may be decoded in another thread while
        the next batch is read); memory is the batches whose frames are held.

        Args:
            entry: a manifest entry with a delta; its chunks are the frames' chunks.
            version: the version whose manifest names it, for error messages.

        Raises:
            IntegrityError: a frame is missing or oversized, or the frames do
                not add up to ``stored_bytes`` (names model, version, tensor, frame).
            StoreUnavailable: Redis could not be reached.

        Example::

            for i, frame in enumerate(store.blobs.frames(entry, version=7)):
                delta.decode_frame(frame, base[...], out[...])
        """
        from hotswap import delta  # numpy and zstd: only readers of deltas pay for them

        ref = entry.delta
        if ref is None:
            raise IntegrityError(f"tensor {entry.name!r} has no delta blob to read")
        where = f"model {self.model!r}" + (f" v{version}" if version is not None else "")
        where += f" tensor {entry.name!r}: delta frame"
        per_batch = max(1, PIPELINE_BYTES // delta.max_frame_bytes(entry.chunk_bytes))

        def batches() -> Iterator[list[tuple[memoryview | None, int | None]]]:
            for start in range(0, entry.chunks, per_batch):
                batch = range(start, min(start + per_batch, entry.chunks))
                caps = frame_caps(entry, batch)
                # Anonymous memory: its pages are touched only where frames land.
                buf = memoryview(mmap.mmap(-1, sum(caps)))
                names = keys.chunk_keys(
                    self.ns, self.model, ref.blob, entry.chunk_bytes, batch.stop, first=batch.start
                )
                # A batch's frames at once: their caps bound the bytes in flight.
                fetch = functools.partial(self.get_capped, names, caps, buf, len(names))
                yield self.call(f"reading the delta of tensor {entry.name!r}", fetch)

        yield from checked_frames(where, entry, itertools.chain.from_iterable(batches()))

    def get_capped(
        self, names: list[str], caps: list[int], buf: memoryview, window: int | None = None
    ) -> list[tuple[memoryview | None, int | None]]:
        """``_get_capped_primary``, from replicas first where ``replicas`` is set: the
        values they could not serve are read from the primaries, in a buffer of their own."""
        if self.replicas is None:
            return self._get_capped_primary(names, caps, buf, window)
        served = self.replicas.read_capped(names, caps, buf)
        again = [i for i, got in enumerate(served) if got is None]
        out: list[tuple[memoryview | None, int | None]] = [g or (None, None) for g in served]
        if again:
            more = [caps[i] for i in again]
            rest = memoryview(mmap.mmap(-1, sum(more)))
            got = self._get_capped_primary([names[i] for i in again], more, rest, window)
            for i, value in zip(again, got, strict=True):
                out[i] = value
        return out

    def _get_capped_primary(
        self, names: list[str], caps: list[int], buf: memoryview, window: int | None = None
    ) -> list[tuple[memoryview | None, int | None]]:
        """Each key's value (None: absent or over its cap) and its length (None: absent).

        Values land in consecutive slots of ``buf`` on the zero-copy path (a
        longer one is cut there and refused here), as redis-py's bytes elsewhere.
        """
        fast = self._blob_io
        if fast is not None:
            ends = list(itertools.accumulate(caps))
            slots = [buf[e - c : e] for e, c in zip(ends, caps, strict=True)]
            with contextlib.suppress(*transport.REDIRECTED):
                lengths = fast.get_into(names, slots, window=window)
                return [
                    (slot[:n] if n is not None and n <= len(slot) else None, n)
                    for slot, n in zip(slots, lengths, strict=True)
                ]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        values: list[bytes | None] = pipe.execute()
        return [
            (None, None) if v is None else (memoryview(v) if len(v) <= cap else None, len(v))
            for v, cap in zip(values, caps, strict=True)
        ]

    def _read_chunks(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        where: str,
        on_chunk: Callable[[int, int], None] | None,
        *,
        replicas: bool = True,
    ) -> None:
        """Chunks ``chunks`` of ``entry`` into ``out``, which starts where the first one does:
        from replicas first where ``replicas`` is set, the rest from the primaries."""
        names = keys.chunk_keys(
            self.ns, self.model, entry.digest, entry.chunk_bytes, chunks.stop, first=chunks.start
        )
        todo = [chunks]
        if replicas and self.replicas is not None and len(chunks):
            todo = self.replicas.read(entry, chunks, out, names, on_chunk)
        base = chunk_span(entry, chunks.start)[0]
        for run in todo:
            part = out[
                chunk_span(entry, run.start)[0] - base : chunk_span(entry, run.stop - 1)[1] - base
            ]
            mine = names[run.start - chunks.start : run.stop - chunks.start]
            if not self._read_fast(entry, run, part, mine, where=where, on_chunk=on_chunk):
                self._read_pipelined(entry, run, part, mine, where=where, on_chunk=on_chunk)

    def _read_fast(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        names: list[str],
        *,
        where: str,
        on_chunk: Callable[[int, int], None] | None,
    ) -> bool:
        """``_read_chunks`` over the zero-copy path: every chunk straight into ``out``.

        False (nothing raised) where that path does not apply; then redis-py's runs.
        """
        fast = self._blob_io
        if fast is None:
            return False
        base = chunk_span(entry, chunks.start)[0]
        views = [out[slice(*(x - base for x in chunk_span(entry, i)))] for i in chunks]

        def landed(j: int, length: int) -> None:  # j counts from chunks.start
            if on_chunk is not None:
                on_chunk(chunks.start + j, length)

        def fetch() -> list[int | None] | None:
            try:
                return fast.get_into(names, views, landed if on_chunk is not None else None)
            except transport.REDIRECTED:
                return None

        lengths = self.call(f"reading tensor {entry.name!r}", fetch)
        if lengths is None:
            return False
        for i, got in zip(chunks, lengths, strict=True):
            check_chunk(where, entry, i, got)
        return True

    def _read_pipelined(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        names: list[str],
        *,
        where: str,
        on_chunk: Callable[[int, int], None] | None,
    ) -> None:
        """``_read_chunks`` over redis-py's pipelines, one batch of GETs per round trip."""
        base = chunk_span(entry, chunks.start)[0]
        for batch in chunk_batches(entry, chunks):

            def fetch(batch: range = batch) -> list[bytes | None]:
                pipe = self.client.pipeline(transaction=False)
                for i in batch:
                    pipe.get(names[i - chunks.start])
                return list(pipe.execute())

            got = self.call(f"reading tensor {entry.name!r}", fetch)
            for i, chunk in zip(batch, got, strict=True):
                check_chunk(where, entry, i, None if chunk is None else len(chunk))
                start, end = chunk_span(entry, i)
                out[start - base : end - base] = cast(bytes, chunk)  # check_chunk: present
                if on_chunk is not None:
                    on_chunk(i, end - start)
