"""The blob index and the keys of stored blobs: which exist, touch, delete.

A sorted set indexes each blob by when a publish last referenced it (gc's
grace clock). ``BlobIndex`` is the part of a model's blob I/O that names and
counts chunk keys without moving tensor bytes: checking which exist,
touching the index, deleting blobs round by round, listing orphans.
``hotswap.blobs.BlobStore`` builds the reads and writes of content on it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import redis.cluster
import tenacity

from hotswap import keys
from hotswap.connection import RedisClient, guarded, operation_retry
from hotswap.manifest import TensorEntry

T = TypeVar("T")
# Chunk keys one deletion round names: what gc holds at once, whatever an id declares.
DELETE_BATCH = 8192


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


class BlobIndex:
    """The blob index and chunk keys of one model under one namespace (see ``BlobStore``)."""

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

    @functools.cached_property
    def _cluster(self) -> bool:
        return isinstance(self.client, redis.cluster.RedisCluster)

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
        """Delete blobs (all their chunks) and their index entries; returns chunks deleted
        (``delete_blobs_measured`` says what they held too)."""
        return self.delete_blobs_measured(blobs)[0]

    def delete_blobs_measured(self, blobs: Sequence[str]) -> tuple[int, int]:
        """Delete blobs (all their chunks) and their index entries; returns the chunks
        deleted and the bytes they held (STRLEN, in the same round trips).

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
        deleted = freed = 0
        for groups, finished in self._deletion_rounds(blobs):

            def delete(
                groups: list[list[str]] = groups, finished: list[str] = finished
            ) -> tuple[int, int]:
                n = self._unlink(groups) if groups else (0, 0)
                if finished:
                    self.client.zrem(index, *finished)
                return n

            chunks, held = self.call("deleting blobs", delete)
            deleted, freed = deleted + chunks, freed + held
        return deleted, freed

    def _unlink(self, groups: Sequence[Sequence[str]]) -> tuple[int, int]:
        """UNLINK every key of ``groups`` (as ``_per_group``), after STRLEN of each in the
        same pipeline: (keys deleted, bytes they held)."""
        pipe = self.client.pipeline(transaction=False)
        flat = [k for group in groups for k in group]
        for name in flat:
            pipe.strlen(name)
        for group in groups:
            for args in [group] if not self._cluster else [[key] for key in group]:
                pipe.execute_command("UNLINK", *args)
        replies = pipe.execute()
        return sum(int(n) for n in replies[len(flat) :]), sum(int(n) for n in replies[: len(flat)])

    def blob_bytes(self, blobs: Sequence[str]) -> int:
        """The bytes the chunks of ``blobs`` hold in Redis (what deleting them frees).

        STRLEN of every chunk key, pipelined a round of ``DELETE_BATCH`` keys at a
        time (a missing chunk counts 0).

        Raises:
            StoreUnavailable: Redis could not be reached.
        """
        total = 0
        for groups, _ in self._deletion_rounds(blobs):
            names = [k for group in groups for k in group]

            def measure(names: list[str] = names) -> int:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.strlen(name)
                return sum(int(n) for n in pipe.execute())

            if names:
                total += self.call("measuring blobs", measure)
        return total

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
