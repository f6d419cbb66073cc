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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis
import redis.cluster
import tenacity

from hotswap import keys, transport
from hotswap.connection import RedisClient, guarded, operation_retry
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry

T = TypeVar("T")
# Bytes queued in one pipeline round trip: big enough to stream, small enough
# to bound the client's buffers.
PIPELINE_BYTES = 32 * 1024 * 1024
# The buffer a streamed read (``BlobStore.stream``) reuses for each batch of chunks.
STREAM_BYTES = PIPELINE_BYTES
# Chunk keys one deletion round names: what gc holds at once, whatever an id declares.
DELETE_BATCH = 8192


def _span(entry: TensorEntry, i: int) -> tuple[int, int]:
    """Where chunk ``i`` of ``entry`` starts and ends in the tensor's bytes."""
    start = i * entry.chunk_bytes
    return start, min(start + entry.chunk_bytes, entry.nbytes)


def _batches(entry: TensorEntry, chunks: range | None = None) -> Iterator[range]:
    """The chunk indices of ``entry`` (or of ``chunks``) in runs of at most ``PIPELINE_BYTES``."""
    chunks = range(entry.chunks) if chunks is None else chunks
    per_batch = max(1, PIPELINE_BYTES // entry.chunk_bytes)
    for start in range(chunks.start, chunks.stop, per_batch):
        yield range(start, min(start + per_batch, chunks.stop))


def check_chunk(where: str, entry: TensorEntry, i: int, got: int | None) -> None:
    """Refuse chunk ``i`` read back as ``got`` bytes (None: absent), whichever path read it.

    Raises:
        IntegrityError: the chunk is missing, or not the length the manifest implies.
    """
    start, end = _span(entry, i)
    if got is None:
        raise IntegrityError(
            f"{where} tensor {entry.name!r}: chunk {i} of {entry.chunks} is missing "
            "from Redis (collected or lost); publish again"
        )
    if got != end - start:
        raise IntegrityError(
            f"{where} tensor {entry.name!r}: chunk {i} is {got} bytes, "
            f"expected {end - start} (truncated or corrupted)"
        )


def stored_blobs(entry: TensorEntry) -> tuple[str, ...]:
    """The names of the blobs holding an entry's bytes: its full blob, its delta blob, or
    both (a keyframe). All are cut in the entry's chunks (``keys.blob_id``)."""
    ref = entry.delta
    if ref is None:
        return (entry.digest,)
    return (entry.digest, ref.blob) if ref.keyframe else (ref.blob,)


def blob_ids(entry: TensorEntry) -> list[str]:
    """The blob index ids of ``stored_blobs`` (none for an empty tensor)."""
    if not entry.chunks:
        return []
    return [keys.blob_id(name, entry.chunk_bytes, entry.chunks) for name in stored_blobs(entry)]


def _stored_as(entry: TensorEntry) -> tuple[tuple[str, ...], int, int]:
    return stored_blobs(entry), entry.chunk_bytes, entry.nbytes


def _count(entry: TensorEntry) -> int:
    """How many chunk keys the entry's stored blobs have."""
    return entry.chunks * len(stored_blobs(entry))


def _unique_blobs(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """One entry per way of storing a content (tied tensors share one), empty tensors left out."""
    unique = {_stored_as(e): e for e in entries if e.chunks}
    return list(unique.values())


class BlobStore:
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

    def __init__(
        self,
        client: RedisClient,
        model: str,
        *,
        namespace: str = "hotswap",
        retrying: tenacity.Retrying | None = None,
    ) -> None:
        self.client = client
        self.model = keys.check_name(model)
        self.ns = keys.check_name(namespace, "namespace")
        self._retrying = retrying or operation_retry()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the retry policy, mapping Redis failures to HotswapError."""
        return guarded(self._retrying, self.model, what, fn)

    def _key(self, fn: Callable[..., str], *args: Any) -> str:
        return fn(self.ns, self.model, *args)

    def _chunk_keys(self, entry: TensorEntry) -> list[str]:
        """Every chunk key of the entry's stored blobs (full, delta, or both)."""
        return [
            k
            for name in stored_blobs(entry)
            for k in keys.chunk_keys(self.ns, self.model, name, entry.chunk_bytes, entry.chunks)
        ]

    @functools.cached_property
    def _cluster(self) -> bool:
        return isinstance(self.client, redis.cluster.RedisCluster)

    @functools.cached_property
    def _blob_io(self) -> transport.ChunkIO | None:
        """The zero-copy chunk path (hotswap.transport), None where only redis-py's applies."""
        return transport.ChunkIO.of(self.client)

    # -- which blobs are stored -------------------------------------------------

    def _per_group(
        self,
        command: str,
        groups: Sequence[Sequence[str]],
        touch: Mapping[str, float] | None = None,
    ) -> list[int]:
        """``command`` (EXISTS, UNLINK) over each group of keys: the count each returned.

        One multi-key command per group on a single server. A cluster refuses
        keys of different slots in one command (a blob's chunks are spread
        over slots), so there each key is its own command, summed per group.
        ``touch`` (blob id -> time) is written to the blob index first, in
        the same round trip.
        """
        pipe = self.client.pipeline(transaction=False)
        if touch:
            pipe.zadd(self._key(keys.blob_index_key), dict(touch))
        for group in groups:
            for args in [group] if not self._cluster else [[key] for key in group]:
                pipe.execute_command(command, *args)
        replies = iter(pipe.execute()[1 if touch else 0 :])
        if not self._cluster:
            return [int(next(replies)) for _ in groups]
        return [sum(int(next(replies)) for _ in group) for group in groups]

    @staticmethod
    def _index_members(entries: Iterable[TensorEntry], now: float | None) -> dict[str, float]:
        stamp = now or time.time()
        return {blob: stamp for e in entries for blob in blob_ids(e)}

    def touch_blobs(self, entries: Iterable[TensorEntry], now: float | None = None) -> None:
        """Mark blobs as referenced now, so gc's grace period protects them."""
        members = self._index_members(entries, now)
        if members:
            key = self._key(keys.blob_index_key)
            self.call("indexing blobs", lambda: self.client.zadd(key, members))

    def unindex_absent(self, entries: Sequence[TensorEntry]) -> None:
        """Take the full blobs of ``entries`` that have no chunk at all out of the index.

        A publish touches a changed tensor's full blob before it knows the
        tensor will go as a delta; this drops that touch again, so that the
        index names only blobs that exist (a blob with any chunk stays, for gc).
        """
        ids = {keys.blob_id(e.digest, e.chunk_bytes, e.chunks) for e in entries if e.chunks}
        groups = [keys.blob_keys_of_id(self.ns, self.model, b) for b in sorted(ids)]
        counts = self.call("checking blobs", lambda: self._per_group("EXISTS", groups))
        gone = [b for b, n in zip(sorted(ids), counts, strict=True) if not n]
        if gone:
            key = self._key(keys.blob_index_key)
            self.call("indexing blobs", lambda: self.client.zrem(key, *gone))

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

    # -- chunks in and out ------------------------------------------------------

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
        if len(data) != entry.nbytes:
            raise IntegrityError(
                f"tensor {entry.name!r}: {len(data)} bytes to upload, manifest says {entry.nbytes}"
            )
        names = keys.chunk_keys(self.ns, self.model, entry.digest, entry.chunk_bytes, entry.chunks)
        values = [data[slice(*_span(entry, i))] for i in range(entry.chunks)]
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
        ref = entry.delta
        stored = sum(len(f) for f in frames)
        if ref is None or len(frames) != entry.chunks or stored != ref.stored_bytes:
            raise IntegrityError(
                f"tensor {entry.name!r}: {len(frames)} delta frames of {stored} bytes do not "
                f"match its entry ({entry.chunks} chunks, delta {ref and ref.stored_bytes} bytes)"
            )
        names = keys.chunk_keys(self.ns, self.model, ref.blob, entry.chunk_bytes, entry.chunks)
        return self._send(entry, names, [memoryview(f) for f in frames], progress)

    def _send(
        self,
        entry: TensorEntry,
        names: list[str],
        values: list[memoryview],
        progress: Callable[[int], None] | None,
    ) -> int:
        """SET ``names`` to ``values`` (one per chunk of ``entry``), a batch per round trip."""
        sent = 0
        for batch in _batches(entry):
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
        where = f"model {self.model!r}" + (f" v{version}" if version is not None else "")
        if len(out) != entry.nbytes:
            raise IntegrityError(
                f"{where} tensor {entry.name!r}: buffer is {len(out)} bytes, need {entry.nbytes}"
            )
        self._read_chunks(entry, range(entry.chunks), out, where, on_chunk)

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
        for batch in _batches(entry):
            base, stop = _span(entry, batch.start)[0], _span(entry, batch.stop - 1)[1]
            if buf is None:
                buf = memoryview(bytearray(stop - base))  # the first batch is the largest
            out = buf[: stop - base]
            self._read_chunks(entry, batch, out, where, None)
            yield out

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """The frames of ``entry``'s delta blob (``entry.delta``), in order, one at a time.

        A frame's length varies: each is refused past ``delta.max_frame_bytes``
        of its chunk, and their total must be the ``stored_bytes`` the manifest
        declares. Memory stays at one batch of frames (the buffer is reserved,
        not touched: pages fill only as short frames land). A view is valid
        until the next frame is asked for.

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
        buf: memoryview | None = None
        total = 0
        for start in range(0, entry.chunks, per_batch):
            batch = range(start, min(start + per_batch, entry.chunks))
            caps = [delta.max_frame_bytes(_span(entry, i)[1] - _span(entry, i)[0]) for i in batch]
            if buf is None:
                # Anonymous memory: its pages are touched only where frames land.
                buf = memoryview(mmap.mmap(-1, sum(caps)))
            names = keys.chunk_keys(
                self.ns, self.model, ref.blob, entry.chunk_bytes, batch.stop, first=batch.start
            )
            fetch = functools.partial(self._get_capped, names, caps, buf)
            got = self.call(f"reading the delta of tensor {entry.name!r}", fetch)
            for i, cap, (frame, length) in zip(batch, caps, got, strict=True):
                if frame is None:
                    problem = "is missing from Redis (collected or lost)"
                    if length is not None:
                        problem = f"is {length} bytes, over the {cap} a frame of its chunk can take"
                    raise IntegrityError(f"{where} {i} of {entry.chunks} {problem}; publish again")
                total += len(frame)
                if total > ref.stored_bytes:
                    break
                yield frame
        if total != ref.stored_bytes:
            raise IntegrityError(
                f"{where}s add up to {total if total <= ref.stored_bytes else 'more than'} "
                f"bytes, the manifest says {ref.stored_bytes}; publish again"
            )

    def _get_capped(
        self, names: list[str], caps: list[int], buf: memoryview
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
                lengths = fast.get_into(names, slots)
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
    ) -> None:
        """Chunks ``chunks`` of ``entry`` into ``out``, which starts where the first one does."""
        names = keys.chunk_keys(
            self.ns, self.model, entry.digest, entry.chunk_bytes, chunks.stop, first=chunks.start
        )
        if not self._read_fast(entry, chunks, out, names, where=where, on_chunk=on_chunk):
            self._read_pipelined(entry, chunks, out, names, where=where, on_chunk=on_chunk)

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
        base = _span(entry, chunks.start)[0]
        views = [out[slice(*(x - base for x in _span(entry, i)))] for i in chunks]

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
        base = _span(entry, chunks.start)[0]
        for batch in _batches(entry, chunks):

            def fetch(batch: range = batch) -> list[bytes | None]:
                pipe = self.client.pipeline(transaction=False)
                for i in batch:
                    pipe.get(names[i - chunks.start])
                return list(pipe.execute())

            got = self.call(f"reading tensor {entry.name!r}", fetch)
            for i, chunk in zip(batch, got, strict=True):
                check_chunk(where, entry, i, None if chunk is None else len(chunk))
                start, end = _span(entry, i)
                out[start - base : end - base] = cast(bytes, chunk)  # check_chunk: present
                if on_chunk is not None:
                    on_chunk(i, end - start)

    # -- the blob index and deletion ----------------------------------------------

    def blob_index(self) -> dict[str, float]:
        """Blob id -> last time a publish referenced it."""
        key = self._key(keys.blob_index_key)
        rows = self.call(
            "reading the blob index", lambda: self.client.zrange(key, 0, -1, withscores=True)
        )
        return {m.decode(): float(s) for m, s in rows}

    def blob_scores(self, blobs: Sequence[str]) -> list[float | None]:
        """Each blob id's time in the index, None where it is not indexed."""
        if not blobs:
            return []
        key = self._key(keys.blob_index_key)
        return list(self.call("reading the blob index", lambda: self.client.zmscore(key, blobs)))

    def delete_blobs(self, blobs: Sequence[str]) -> int:
        """Delete blobs (all their chunks) and their index entries; returns chunks deleted.

        Round by round, each of at most ``DELETE_BATCH`` chunk keys: however
        many chunks an id names, gc holds one round's key names at a time. A
        blob leaves the index only once all its chunks are gone, so a gc that
        stops midway finds it again.

        Raises:
            ConfigError: an id is not of the form ``keys.blob_id`` writes
                (``keys.blob_id_problem`` says why; gc checks first).
            StoreUnavailable: Redis could not be reached.
        """
        index = self._key(keys.blob_index_key)
        deleted = 0
        for groups, finished in self._deletion_rounds(blobs):

            def delete(groups: list[list[str]] = groups, finished: list[str] = finished) -> int:
                n = sum(self._per_group("UNLINK", groups)) if groups else 0
                if finished:
                    self.client.zrem(index, *finished)
                return n

            deleted += self.call("deleting blobs", delete)
        return deleted

    def _stored_rounds(self, blob: str) -> list[range]:
        """The rounds of ``DELETE_BATCH`` chunks of ``blob`` that may hold a stored chunk.

        Anyone who can write the index can add an id naming millions of
        chunks that do not exist. A blob of more than one round is probed
        first, the first and last chunk of every round in one round trip, and
        only rounds with either are deleted: a publish writes a blob's chunks
        in order, so what a crash leaves of a round reaches one of its ends
        (on a cluster, whose nodes are written side by side, a crash can leave
        a round's middle only).
        """
        count = keys.parse_blob_id(blob)[2]
        rounds = [range(s, min(s + DELETE_BATCH, count)) for s in range(0, count, DELETE_BATCH)]
        if len(rounds) <= 1:
            return rounds
        ends = [
            [*keys.blob_keys_of_id(self.ns, self.model, blob, range(r.start, r.start + 1)),
             *keys.blob_keys_of_id(self.ns, self.model, blob, range(r.stop - 1, r.stop))]
            for r in rounds
        ]  # fmt: skip
        found = self.call("checking blobs", lambda: self._per_group("EXISTS", ends))
        return [r for r, n in zip(rounds, found, strict=True) if n]

    def _deletion_rounds(self, blobs: Sequence[str]) -> Iterator[tuple[list[list[str]], list[str]]]:
        """Rounds of (chunk keys per blob, blobs whose last chunks these are)."""
        groups: list[list[str]] = []
        finished: list[str] = []
        size = 0
        for blob in blobs:
            for chunks in self._stored_rounds(blob):
                group = keys.blob_keys_of_id(self.ns, self.model, blob, chunks)
                groups.append(group)
                size += len(group)
                if size >= DELETE_BATCH:
                    yield groups, finished
                    groups, finished, size = [], [], 0
            finished.append(blob)
        if groups or finished:
            yield groups, finished

    def stored_blob_keys(self) -> Iterator[str]:
        """Every blob chunk key of this model (SCAN; for gc of unindexed orphans and tests)."""
        pattern = self._key(keys.blob_prefix) + "*"
        for k in self.client.scan_iter(match=pattern, count=1000):
            yield k.decode() if isinstance(k, bytes) else k
