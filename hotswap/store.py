"""All Redis I/O of one model: versions, manifests, blobs, log, agents, notices.

Every operation goes through one tenacity policy (``connection.operation_retry``)
and turns lasting connection failures into ``StoreUnavailable``. Nothing here
decides policy; the publisher and the agent do.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import redis
import tenacity

from hotswap import keys, transport
from hotswap.connection import TRANSIENT, RedisClient, operation_retry, retry_from_settings
from hotswap.errors import (
    ConfigError,
    FormatError,
    HotswapError,
    IntegrityError,
    NotFound,
    StoreUnavailable,
    VersionConflict,
)
from hotswap.manifest import EntryCache, Limits, Manifest, TensorEntry, decode
from hotswap.settings import HotswapSettings
from hotswap.status import MAX_STATUS_BYTES

T = TypeVar("T")
DEFAULT_LIMITS = Limits()
LOG_MAXLEN = 10_000
# Bytes queued in one pipeline round trip: big enough to stream, small enough
# to bound the client's buffers.
PIPELINE_BYTES = 32 * 1024 * 1024

# KEYS: head, manifest:V, log. ARGV: parent ('' = none), V, manifest bytes,
# channel, notice, log maxlen, then log field/value pairs.
_COMMIT = """
local head = redis.call('GET', KEYS[1]) or ''
if head ~= ARGV[1] then return {'conflict', head} end
if head ~= '' and tonumber(ARGV[2]) <= tonumber(head) then return {'stale', head} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'exists', head} end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 7))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', head}
"""


class Store:
    """Redis I/O for one model under one namespace."""

    def __init__(
        self,
        client: RedisClient,
        model: str,
        *,
        namespace: str = "hotswap",
        retrying: tenacity.Retrying | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.client = client
        self.model = keys.check_name(model)
        self.ns = keys.check_name(namespace, "namespace")
        self.limits = limits
        self._entries = EntryCache()
        self._retrying = retrying or operation_retry()
        self._commit_script = client.register_script(_COMMIT)

    @classmethod
    def from_settings(
        cls,
        client: RedisClient,
        model: str,
        settings: HotswapSettings,
        retrying: tenacity.Retrying | None = None,
    ) -> Store:
        """A Store with the settings' namespace, size limits and (unless given) retry policy."""
        return cls(
            client,
            model,
            namespace=settings.namespace,
            retrying=retrying or retry_from_settings(settings),
            limits=Limits(
                max_manifest_bytes=settings.max_manifest_bytes,
                max_tensors=settings.max_tensors,
                max_tensor_bytes=settings.max_tensor_bytes,
            ),
        )

    # -- plumbing -------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the retry policy, mapping Redis failures to HotswapError."""
        try:
            return self._retrying.copy()(fn)
        except HotswapError:
            raise
        except redis.AuthenticationError as e:
            raise ConfigError(f"Redis refused the credentials while {what}: {e}") from e
        except redis.exceptions.NoPermissionError as e:
            raise ConfigError(
                f"Redis user may not do this while {what} for model {self.model!r}: {e}"
            ) from e
        except TRANSIENT as e:
            raise StoreUnavailable(
                f"Redis unreachable while {what} for model {self.model!r} "
                f"({type(e).__name__}: {e}); check HOTSWAP_REDIS_URL and the server"
            ) from e
        except redis.RedisError as e:
            raise StoreUnavailable(f"Redis error while {what} for model {self.model!r}: {e}") from e

    def _key(self, fn: Callable[..., str], *args: Any) -> str:
        return fn(self.ns, self.model, *args)

    def ping(self) -> None:
        self.call("connecting", self.client.ping)

    # -- versions and manifests -----------------------------------------------

    def head(self) -> int | None:
        return self._head(
            self.call("reading head", lambda: self.client.get(self._key(keys.head_key)))
        )

    def head_and_manifest_bytes(self, guess: int | None) -> tuple[int | None, bytes | None]:
        """Head, and manifest ``guess``'s bytes if head is ``guess``, in one round trip.

        A publisher guesses the version it made last: publishing again on top
        of it then costs one read instead of two.
        """
        if guess is None:
            return self.head(), None
        head_key, manifest_key = self._key(keys.head_key), self._key(keys.manifest_key, guess)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(head_key)
            pipe.get(manifest_key)
            return list(pipe.execute())

        raw, data = self.call("reading head", read)
        head = self._head(raw)
        return head, bytes(data) if head == guess and data is not None else None

    def _head(self, raw: Any) -> int | None:
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise FormatError(
                f"model {self.model!r}: head holds {bytes(raw)[:40]!r}, not a version number; "
                "someone wrote it by hand: set it to a stored version"
            ) from None

    def manifest_bytes(self, version: int) -> bytes:
        key = self._key(keys.manifest_key, version)
        raw = self.call(f"reading manifest v{version}", lambda: self.client.get(key))
        if raw is None:
            raise NotFound(f"model {self.model!r} has no version {version} (unknown or collected)")
        return bytes(raw)

    def manifest(
        self, version: int, signing_keys: Sequence[bytes] = (), data: bytes | None = None
    ) -> Manifest:
        """Read (unless ``data`` holds its bytes), decode and (with keys) verify a manifest."""
        return decode(
            self.manifest_bytes(version) if data is None else data,
            keys=signing_keys,
            limits=self.limits,
            expect_model=self.model,
            expect_version=version,
            cache=self._entries,
        )

    def head_manifest(self, signing_keys: Sequence[bytes] = ()) -> Manifest | None:
        head = self.head()
        return None if head is None else self.manifest(head, signing_keys)

    def versions(self) -> list[int]:
        """Every version whose manifest is still stored, ascending."""
        pattern = self._key(keys.manifest_pattern)

        def scan() -> list[int]:
            return sorted(
                keys.version_from_manifest_key(k.decode() if isinstance(k, bytes) else k)
                for k in self.client.scan_iter(match=pattern, count=1000)
            )

        return self.call("listing versions", scan)

    def reserve_version(self) -> int:
        return int(
            self.call("reserving a version", lambda: self.client.incr(self._key(keys.seq_key)))
        )

    def commit(
        self,
        manifest: Manifest,
        manifest_bytes: bytes,
        log_fields: dict[str, str | int | float],
        notice: bytes,
    ) -> None:
        """Make ``manifest`` the head if head is still its parent (atomic, one script).

        Raises VersionConflict (and writes nothing) if head moved.
        """
        version, parent = manifest.version, manifest.parent
        flat: list[str | int | float] = []
        for name, value in log_fields.items():
            flat += [name, value]
        args = [
            "" if parent is None else str(parent),
            str(version),
            manifest_bytes,
            self._key(keys.events_channel),
            notice,
            LOG_MAXLEN,
            *flat,
        ]
        script_keys = [
            self._key(keys.head_key),
            self._key(keys.manifest_key, version),
            self._key(keys.log_key),
        ]
        status, head = self.call(
            f"committing v{version}", lambda: self._commit_script(keys=script_keys, args=args)
        )
        if status == b"ok":
            return
        head_text = head.decode() or "none"
        # Only this script writes manifests, and V is ours (INCR): if manifest:V
        # holds our bytes, an earlier attempt committed before its reply was
        # lost, even if another publish has moved head on since.
        if self._stored_equals(version, manifest_bytes):
            return
        if status == b"exists":
            raise VersionConflict(
                f"model {self.model!r} v{version} already exists; versions are immutable"
            )
        if status == b"stale":
            raise VersionConflict(
                f"model {self.model!r}: v{version} is not newer than head v{head_text}; "
                "reserve a new version number"
            )
        read = "empty" if parent is None else f"v{parent}"
        now = "empty" if head_text == "none" else f"v{head_text}"
        raise VersionConflict(
            f"model {self.model!r}: head is {now}, not {read} as this publish read it; "
            "another publisher committed first, publish again on top of it"
        )

    def _stored_equals(self, version: int, data: bytes) -> bool:
        try:
            return self.manifest_bytes(version) == data
        except NotFound:
            return False

    def delete_manifests(self, versions: Iterable[int]) -> int:
        names = [self._key(keys.manifest_key, v) for v in versions]
        if not names:
            return 0
        return int(self.call("deleting manifests", lambda: self.client.delete(*names)))

    # -- log ------------------------------------------------------------------

    def append_log(self, fields: dict[str, str | int | float]) -> None:
        key = self._key(keys.log_key)
        self.call(
            "writing the log",
            lambda: self.client.xadd(key, fields, maxlen=LOG_MAXLEN, approximate=True),
        )

    def log(self, count: int = 50) -> list[dict[str, str]]:
        """Newest first: one dict per publish, rollback or gc."""
        key = self._key(keys.log_key)
        rows = self.call("reading the log", lambda: self.client.xrevrange(key, count=count))
        out = []
        for entry_id, fields in rows:
            row = {
                k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()
            }
            row["id"] = entry_id.decode()
            out.append(row)
        return out

    # -- blobs ----------------------------------------------------------------

    def _chunk_keys(self, entry: TensorEntry) -> list[str]:
        return keys.chunk_keys(self.ns, self.model, entry.digest, entry.chunk_bytes, entry.chunks)

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
        return {keys.blob_id(e.digest, e.chunk_bytes, e.chunks): stamp for e in entries if e.chunks}

    def touch_blobs(self, entries: Iterable[TensorEntry], now: float | None = None) -> None:
        """Mark blobs as referenced now, so gc's grace period protects them."""
        members = self._index_members(entries, now)
        if members:
            key = self._key(keys.blob_index_key)
            self.call("indexing blobs", lambda: self.client.zadd(key, members))

    def missing(
        self,
        entries: Sequence[TensorEntry],
        *,
        expect_present: Sequence[TensorEntry] = (),
        touch: bool = False,
    ) -> list[TensorEntry]:
        """The entries (of both lists) with at least one chunk absent from Redis.

        ``entries`` are checked blob by blob. ``expect_present`` (blobs believed
        stored, such as the parent version's) are counted together in the same
        round trip, and looked at blob by blob only when that count falls short:
        a pipeline of one EXISTS per blob cost 1.7 ms for 97 tensors, one
        EXISTS over all their chunks 0.7 ms. ``touch`` first marks the blobs
        of ``entries`` as referenced now (as ``touch_blobs`` does, so that a
        concurrent gc's grace period covers them), in the same round trip.
        """

        def blobs(items: Iterable[TensorEntry]) -> list[TensorEntry]:
            unique = {(e.digest, e.chunk_bytes, e.nbytes): e for e in items if e.chunks}
            return list(unique.values())

        todo, likely = blobs(entries), blobs(expect_present)
        likely_keys = [self._chunk_keys(e) for e in likely]

        def check() -> list[int]:
            groups = [self._chunk_keys(e) for e in todo]
            if likely_keys:
                groups.append([k for ks in likely_keys for k in ks])
            stamps = self._index_members(entries, None) if touch else None
            return self._per_group("EXISTS", groups, stamps)

        counts = self.call("checking blobs", check)
        absent = {e for e, n in zip(todo, counts[: len(todo)], strict=True) if n != e.chunks}
        if likely and counts[-1] != sum(len(ks) for ks in likely_keys):
            each = self.call("checking blobs", lambda: self._per_group("EXISTS", likely_keys))
            absent |= {e for e, n in zip(likely, each, strict=True) if n != e.chunks}
        gone = {(e.digest, e.chunk_bytes, e.nbytes) for e in absent}
        return [
            e for e in (*entries, *expect_present) if (e.digest, e.chunk_bytes, e.nbytes) in gone
        ]

    def upload(
        self,
        entry: TensorEntry,
        data: memoryview,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write a tensor's chunks (idempotent); returns the bytes sent."""
        if len(data) != entry.nbytes:
            raise IntegrityError(
                f"tensor {entry.name!r}: {len(data)} bytes to upload, manifest says {entry.nbytes}"
            )
        names = self._chunk_keys(entry)
        size = entry.chunk_bytes
        sent = 0
        batch: list[int] = []

        def flush(indices: list[int]) -> None:
            def send() -> None:
                fast = self._blob_io
                if fast is not None:
                    with contextlib.suppress(*transport.REDIRECTED):
                        views = [data[i * size : (i + 1) * size] for i in indices]
                        fast.set_chunks([names[i] for i in indices], views)
                        return
                pipe = self.client.pipeline(transaction=False)
                for i in indices:
                    pipe.set(names[i], data[i * size : (i + 1) * size])
                pipe.execute()

            self.call(f"uploading tensor {entry.name!r}", send)

        for i in range(len(names)):
            batch.append(i)
            if len(batch) * size >= PIPELINE_BYTES:
                flush(batch)
                done = sum(min(size, entry.nbytes - j * size) for j in batch)
                sent += done
                if progress:
                    progress(done)
                batch = []
        if batch:
            flush(batch)
            done = sum(min(size, entry.nbytes - j * size) for j in batch)
            sent += done
            if progress:
                progress(done)
        return sent

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """Read a tensor's chunks into ``out`` (exactly ``entry.nbytes`` long).

        Raises IntegrityError naming the tensor for a missing or truncated chunk;
        the digest check is the caller's. ``on_chunk(i, length)`` runs once
        chunk ``i`` is in ``out`` (again for every chunk of a retried read).
        """
        where = f"model {self.model!r}" + (f" v{version}" if version is not None else "")
        if len(out) != entry.nbytes:
            raise IntegrityError(
                f"{where} tensor {entry.name!r}: buffer is {len(out)} bytes, need {entry.nbytes}"
            )
        names = self._chunk_keys(entry)
        size = entry.chunk_bytes
        if self._read_fast(entry, out, names, where, on_chunk):
            return
        per_batch = max(1, PIPELINE_BYTES // size)
        for start in range(0, len(names), per_batch):
            indices = range(start, min(start + per_batch, len(names)))

            def fetch(indices: range = indices) -> list[bytes | None]:
                pipe = self.client.pipeline(transaction=False)
                for i in indices:
                    pipe.get(names[i])
                return list(pipe.execute())

            chunks = self.call(f"reading tensor {entry.name!r}", fetch)
            for i, chunk in zip(indices, chunks, strict=True):
                expected = min(size, entry.nbytes - i * size)
                if chunk is None:
                    raise IntegrityError(
                        f"{where} tensor {entry.name!r}: chunk {i} of {len(names)} is missing "
                        "from Redis (collected or lost); publish again"
                    )
                if len(chunk) != expected:
                    raise IntegrityError(
                        f"{where} tensor {entry.name!r}: chunk {i} is {len(chunk)} bytes, "
                        f"expected {expected} (truncated or corrupted)"
                    )
                out[i * size : i * size + expected] = chunk
                if on_chunk is not None:
                    on_chunk(i, expected)

    @functools.cached_property
    def _blob_io(self) -> transport.ChunkIO | None:
        """The zero-copy chunk path (hotswap.transport), None where only redis-py's applies."""
        return transport.ChunkIO.of(self.client)

    def _read_fast(
        self,
        entry: TensorEntry,
        out: memoryview,
        names: list[str],
        where: str,
        on_chunk: Callable[[int, int], None] | None,
    ) -> bool:
        """``read_into`` over the zero-copy path: every chunk straight into ``out``.

        False (nothing raised) where that path does not apply; then redis-py's runs.
        """
        fast = self._blob_io
        if fast is None:
            return False
        size = entry.chunk_bytes
        views = [out[i : i + size] for i in range(0, entry.nbytes, size)]

        def fetch() -> list[int | None] | None:
            try:
                return fast.get_into(names, views, on_chunk)
            except transport.REDIRECTED:
                return None

        lengths = self.call(f"reading tensor {entry.name!r}", fetch)
        if lengths is None:
            return False
        for i, (got, view) in enumerate(zip(lengths, views, strict=True)):
            if got is None:
                raise IntegrityError(
                    f"{where} tensor {entry.name!r}: chunk {i} of {len(names)} is missing "
                    "from Redis (collected or lost); publish again"
                )
            if got != len(view):
                raise IntegrityError(
                    f"{where} tensor {entry.name!r}: chunk {i} is {got} bytes, "
                    f"expected {len(view)} (truncated or corrupted)"
                )
        return True

    def blob_index(self) -> dict[str, float]:
        """Blob id -> last time a publish referenced it."""
        key = self._key(keys.blob_index_key)
        rows = self.call(
            "reading the blob index", lambda: self.client.zrange(key, 0, -1, withscores=True)
        )
        return {m.decode(): float(s) for m, s in rows}

    def blob_scores(self, blobs: Sequence[str]) -> list[float | None]:
        if not blobs:
            return []
        key = self._key(keys.blob_index_key)
        return list(self.call("reading the blob index", lambda: self.client.zmscore(key, blobs)))

    def delete_blobs(self, blobs: Sequence[str]) -> int:
        """Delete blobs (all their chunks) and their index entries; returns chunks deleted."""
        if not blobs:
            return 0
        index = self._key(keys.blob_index_key)

        def delete() -> int:
            groups = [keys.blob_keys_of_id(self.ns, self.model, blob) for blob in blobs]
            deleted = sum(self._per_group("UNLINK", groups))
            self.client.zrem(index, *blobs)
            return deleted

        return self.call("deleting blobs", delete)

    def stored_blob_keys(self) -> Iterator[str]:
        """Every blob chunk key of this model (SCAN; for gc of unindexed orphans and tests)."""
        pattern = self._key(keys.blob_prefix) + "*"
        for k in self.client.scan_iter(match=pattern, count=1000):
            yield k.decode() if isinstance(k, bytes) else k

    # -- agents ---------------------------------------------------------------

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        agents, beat = self._key(keys.agents_key), self._key(keys.heartbeat_key, agent_id)

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(agents, agent_id, record)
            pipe.set(beat, b"1", px=max(1, int(ttl * 1000)))
            pipe.execute()

        self.call("writing agent status", write)

    def remove_agent(self, agent_id: str) -> None:
        agents, beat = self._key(keys.agents_key), self._key(keys.heartbeat_key, agent_id)

        def remove() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(agents, agent_id)
            pipe.delete(beat)
            pipe.execute()

        self.call("removing agent status", remove)

    def agent_records(self) -> list[tuple[str, bytes, bool]]:
        """(agent id, status bytes, heartbeat alive) for every agent that reported."""
        agents = self._key(keys.agents_key)

        def read() -> list[tuple[str, bytes, bool]]:
            # Agents (their ACL user may write any field) are not trusted here:
            # field names need not be UTF-8 or valid ids, and a value's size is
            # checked before it is read so one huge record cannot bloat `status`.
            fields = sorted(self.client.hkeys(agents))
            if not fields:
                return []
            ids = [f.decode(errors="backslashreplace") for f in fields]
            named = [i for i in ids if keys.is_name(i)]
            pipe = self.client.pipeline(transaction=False)
            for field in fields:
                pipe.hstrlen(agents, field)
            for agent_id in named:
                pipe.exists(self._key(keys.heartbeat_key, agent_id))
            replies = pipe.execute()
            sizes = replies[: len(fields)]
            beating = dict(zip(named, replies[len(fields) :], strict=True))
            readable = [f for f, n in zip(fields, sizes, strict=True) if n <= MAX_STATUS_BYTES]
            values = (
                dict(zip(readable, self.client.hmget(agents, readable), strict=True))
                if readable
                else {}
            )
            return [
                (agent_id, bytes(values.get(field) or b""), bool(beating.get(agent_id)))
                for field, agent_id in zip(fields, ids, strict=True)
            ]

        return self.call("reading agent status", read)

    # -- notices ----------------------------------------------------------------

    def subscribe(self) -> Subscription:
        return Subscription(self)

    def delete_all(self) -> int:
        """Delete every key of this model (demo cleanup); returns the count."""

        def delete() -> int:
            n = 0
            for pattern in keys.namespace_pattern(self.ns, self.model):
                batch = list(self.client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(batch), 1000):
                    n += int(self.client.unlink(*batch[i : i + 1000]))
            return n

        return self.call("deleting the model's keys", delete)


class Subscription:
    """The model's notice channel; ``get`` waits for one raw notice or returns None."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._channel = store._key(keys.events_channel)
        self._pubsub = store.client.pubsub(ignore_subscribe_messages=True)
        store.call("subscribing", lambda: self._pubsub.subscribe(self._channel))

    def get(self, timeout: float) -> bytes | None:
        """One notice's bytes, or None after ``timeout``; raises redis errors unwrapped
        so the agent can tell a dropped connection from silence."""
        deadline = time.monotonic() + timeout
        while True:
            # get_message returns None at once for a (un)subscribe confirmation,
            # so keep waiting until a real message or the deadline.
            message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message.get("type") == "message":
                data = message["data"]
                return data if isinstance(data, bytes) else str(data).encode()
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        # Closing a dead connection is not an error.
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
