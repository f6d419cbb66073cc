"""Redis I/O of one model's metadata: versions, manifests, commit, log, agents, notices.

Tensor content (blobs) is ``hotswap.blobs``'s: ``Store.blobs`` is a
``BlobStore`` on the same client, namespace and retry policy. Every operation
runs under ``connection.guarded`` (one tenacity policy, lasting connection
failures become ``StoreUnavailable``). Nothing here decides policy; the
publisher and the agent do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import tenacity

from hotswap import keys
from hotswap.blobs import BlobStore
from hotswap.connection import RedisClient, guarded, operation_retry, retry_from_settings
from hotswap.errors import FormatError, NotFound, VersionConflict
from hotswap.manifest import EntryCache, Limits, Manifest, decode
from hotswap.settings import HotswapSettings
from hotswap.status import MAX_STATUS_BYTES
from hotswap.subscription import Subscription

__all__ = ["DEFAULT_LIMITS", "LOG_MAXLEN", "MAX_STATUS_BYTES", "Store", "Subscription"]

T = TypeVar("T")
DEFAULT_LIMITS = Limits()
LOG_MAXLEN = 10_000
# How long an agent's record outlives its heartbeat: `hotswap status` shows a
# dead agent as expired for a day, then it is gone (agent ids are new at each
# start unless fixed, so records must not pile up).
AGENT_RECORD_LINGER = 24 * 3600
# Most agent records `status` and gc read: a hostile user could write millions.
MAX_AGENT_RECORDS = 10_000

# KEYS: seq, head. The next number is max(seq, head) + 1: a seq that was
# evicted, deleted or restored older than head costs no failed publish.
# A value that is not a number counts as 0 (head's own check reports it).
_RESERVE = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local head = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local v = math.max(math.floor(seq), math.floor(head)) + 1
redis.call('SET', KEYS[1], string.format('%d', v))
return v
"""

# KEYS: head, manifest:V, log, signed head record. ARGV: parent ('' = none), V,
# manifest bytes, channel, notice, log maxlen, record ('' = none: an unsigned
# commit deletes a record that would name an older head), then log
# field/value pairs. Manifest, head and record change together or not at all.
_COMMIT = """
local head = redis.call('GET', KEYS[1]) or ''
if head ~= ARGV[1] then return {'conflict', head} end
if head ~= '' and tonumber(ARGV[2]) <= tonumber(head) then return {'stale', head} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'exists', head} end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[7] == '' then redis.call('DEL', KEYS[4]) else redis.call('SET', KEYS[4], ARGV[7]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 8))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', head}
"""


# KEYS: head, signed head record. ARGV: expected head, expected record ('' =
# none), new record. A re-sign must not overwrite the record of a commit that
# landed since it read head: that would name the old head again.
_RESIGN = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
return 1
"""


class Store:
    """Redis I/O of one model's metadata under one namespace; ``blobs`` holds its content.

    Args:
        client: a ``redis.Redis`` or ``redis.cluster.RedisCluster``.
        model: the model's name.
        namespace: the key prefix shared by a deployment's models.
        retrying: the retry policy (default ``connection.operation_retry()``).
        limits: size limits a manifest read back must keep.

    Raises:
        ConfigError: the model or namespace name is not allowed in a key.

    Example::

        store = Store(redis.Redis(), "m")
        m = store.head_manifest()  # None before the first publish
        entry = m.by_name()["w"]
        out = bytearray(entry.nbytes)
        store.blobs.read_into(entry, memoryview(out), m.version)
    """

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
        self._reserve_script = client.register_script(_RESERVE)
        self._resign_script = client.register_script(_RESIGN)
        self.blobs = BlobStore(client, self.model, namespace=self.ns, retrying=self._retrying)

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
        return guarded(self._retrying, self.model, what, fn)

    def _key(self, fn: Callable[..., str], *args: Any) -> str:
        return fn(self.ns, self.model, *args)

    def ping(self) -> None:
        self.call("connecting", self.client.ping)

    # -- versions and manifests -----------------------------------------------

    def head(self) -> int | None:
        return self._head(
            self.call("reading head", lambda: self.client.get(self._key(keys.head_key)))
        )

    def head_and_record(self) -> tuple[int | None, bytes | None]:
        """Head and the signed head record's bytes (None where absent), in one round trip."""
        head_key, record_key = self._key(keys.head_key), self._key(keys.head_record_key)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(head_key)
            pipe.get(record_key)
            return list(pipe.execute())

        raw, record = self.call("reading head", read)
        return self._head(raw), None if record is None else bytes(record)

    def head_and_glance(
        self, version: int, edge: int
    ) -> tuple[int | None, tuple[int, bytes, bytes]]:
        """Head, and manifest ``version``'s length and first and last ``edge`` bytes
        (``(0, b"", b"")`` if absent), in one round trip: enough to tell that a
        manifest refused before is unchanged without reading it again."""
        head_key, manifest_key = self._key(keys.head_key), self._key(keys.manifest_key, version)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(head_key)
            pipe.strlen(manifest_key)
            pipe.getrange(manifest_key, 0, edge - 1)
            pipe.getrange(manifest_key, -edge, -1)
            return list(pipe.execute())

        raw, length, first, last = self.call("reading head", read)
        return self._head(raw), (int(length), bytes(first), bytes(last))

    def head_for_commit(self, guess: int | None) -> tuple[int | None, bytes | None, bytes | None]:
        """Head, manifest ``guess``'s bytes if head is ``guess``, and the signed head
        record's bytes (None where absent), in one round trip: what a publish builds on."""
        head_key, record_key = self._key(keys.head_key), self._key(keys.head_record_key)
        manifest_key = None if guess is None else self._key(keys.manifest_key, guess)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(head_key)
            pipe.get(record_key)
            if manifest_key is not None:
                pipe.get(manifest_key)
            return list(pipe.execute())

        raw, record, *data = self.call("reading head", read)
        head = self._head(raw)
        manifest = bytes(data[0]) if data and head == guess and data[0] is not None else None
        return head, manifest, None if record is None else bytes(record)

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
        """A version number no commit has used: one more than both seq and head (atomic)."""
        script_keys = [self._key(keys.seq_key), self._key(keys.head_key)]
        return int(self.call("reserving a version", lambda: self._reserve_script(keys=script_keys)))

    def commit(
        self,
        manifest: Manifest,
        manifest_bytes: bytes,
        log_fields: dict[str, str | int | float],
        notice: bytes,
        record: bytes | None = None,
    ) -> None:
        """Make ``manifest`` the head if head is still its parent (atomic, one script).

        ``record`` (a signed ``hotswap.headrecord``) is written with head;
        None deletes the one there, which would name an older head.

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
            record or b"",
            *flat,
        ]
        script_keys = [
            self._key(keys.head_key),
            self._key(keys.manifest_key, version),
            self._key(keys.log_key),
            self._key(keys.head_record_key),
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

    def replace_head_record(self, head: int, old: bytes | None, new: bytes) -> bool:
        """Write head record ``new`` if head is still ``head`` and the record still
        ``old`` (None: absent), atomically; False (nothing written) if either moved."""
        script_keys = [self._key(keys.head_key), self._key(keys.head_record_key)]
        args = [str(head), old or b"", new]
        done = self.call(
            f"re-signing head v{head}", lambda: self._resign_script(keys=script_keys, args=args)
        )
        return bool(done)

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

    # -- agents ---------------------------------------------------------------

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        """Write one agent's status record and heartbeat (its two keys, nothing shared).

        Each agent has keys of its own (``keys.agent_status_key``,
        ``keys.heartbeat_key``), so a Redis user can be fenced to one agent's
        keys (README, Security). The heartbeat lives ``ttl`` seconds; the
        record ``AGENT_RECORD_LINGER`` longer, so a dead agent shows as gone.
        """
        status = self._key(keys.agent_status_key, agent_id)
        beat = self._key(keys.heartbeat_key, agent_id)
        ttl_ms = max(1, int(ttl * 1000))

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(status, record, px=ttl_ms + AGENT_RECORD_LINGER * 1000)
            pipe.set(beat, b"1", px=ttl_ms)
            pipe.execute()

        self.call("writing agent status", write)

    def remove_agent(self, agent_id: str) -> None:
        """Delete an agent's record and heartbeat, and its field of the older agents' hash."""
        status = self._key(keys.agent_status_key, agent_id)
        beat = self._key(keys.heartbeat_key, agent_id)
        agents = self._key(keys.agents_key)

        def remove() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(status, beat)
            pipe.hdel(agents, agent_id)
            _replies(pipe.execute(raise_on_error=False))  # a hash of the wrong type: no field

        self.call("removing agent status", remove)

    def agent_records(self) -> list[tuple[str, bytes, bool]]:
        """(agent id, status bytes, heartbeat alive) for every agent that reported.

        The bytes are empty where the record could not be read
        (``agent_report`` says why).
        """
        return [(r.agent_id, r.data or b"", r.alive) for r in self.agent_report().records]

    def agent_report(self) -> AgentRecords:
        """Every agent's status record as stored, and what could not be read.

        Agents' Redis users are not trusted here: a key of the wrong type, a
        record over ``MAX_STATUS_BYTES`` (its size is asked first), a field
        name that is no agent id, more records than ``MAX_AGENT_RECORDS``: each
        is reported, and the rest still read. Records are read from each
        agent's key and from the hash older agents wrote; an agent in both is
        read from its key.

        Raises:
            StoreUnavailable: Redis could not be reached.
            ConfigError: this Redis user may not read the records.
        """
        return self.call("reading agent status", self._read_agents)

    def _read_agents(self) -> AgentRecords:
        problems: list[str] = []
        found: list[bytes] = []  # as stored: a key need not be UTF-8
        for key in self.client.scan_iter(match=self._key(keys.agent_status_pattern), count=1000):
            if len(found) == MAX_AGENT_RECORDS:
                problems.append(f"more than {MAX_AGENT_RECORDS} agent records: the rest unread")
                break
            found.append(key if isinstance(key, bytes) else key.encode())
        agents = self._key(keys.agents_key)
        pipe = self.client.pipeline(transaction=False)
        for key in found:
            pipe.strlen(key)
        pipe.hkeys(agents)
        *sizes, fields = _replies(pipe.execute(raise_on_error=False))
        if _wrong_type(fields):
            problems.append(
                f"{agents} is not a hash (WRONGTYPE): the records older agents wrote there "
                "cannot be read; an admin may DEL it (agents of this version do not write it)"
            )
            fields = []
        own = {
            keys.agent_of_status_key(k.decode(errors="backslashreplace")): (k, n)
            for k, n in zip(found, sizes, strict=True)
        }
        if len(fields) > MAX_AGENT_RECORDS:
            problems.append(
                f"{agents} holds more than {MAX_AGENT_RECORDS} records: the rest unread"
            )
        legacy = {
            name: f
            for f in sorted(fields)[:MAX_AGENT_RECORDS]
            if (name := f.decode(errors="backslashreplace")) not in own
        }
        readable = [k for k, n in own.values() if type(n) is int and 0 < n <= MAX_STATUS_BYTES]
        named = [i for i in (*own, *legacy) if keys.is_name(i)]
        pipe = self.client.pipeline(transaction=False)
        for key in readable:
            pipe.get(key)
        for agent_id in named:
            pipe.exists(self._key(keys.heartbeat_key, agent_id))
        for field in legacy.values():
            pipe.hstrlen(agents, field)
        replies = _replies(pipe.execute(raise_on_error=False))
        values = dict(zip(readable, replies[: len(readable)], strict=True))
        alive = dict(zip(named, replies[len(readable) : len(readable) + len(named)], strict=True))
        hsizes = replies[len(readable) + len(named) :]
        small = [f for f, n in zip(legacy.values(), hsizes, strict=True) if n <= MAX_STATUS_BYTES]
        hvalues = dict(zip(small, self.client.hmget(agents, small), strict=True)) if small else {}
        records = [
            _record(agent_id, values.get(key), size, bool(alive.get(agent_id)), "status key")
            for agent_id, (key, size) in own.items()
        ]
        records += [
            _record(agent_id, hvalues.get(field), size, bool(alive.get(agent_id)), "hash field")
            for (agent_id, field), size in zip(legacy.items(), hsizes, strict=True)
        ]
        kept = [r for r in records if r is not None]
        return AgentRecords(sorted(kept, key=lambda r: r.agent_id), problems)

    # -- notices ----------------------------------------------------------------

    def subscribe(self) -> Subscription:
        """Listen on the model's notice channel (see ``Subscription``)."""
        return Subscription(self.client, self._key(keys.events_channel), self.call)

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


# -- agent records: what was read, pure -----------------------------------------------


@dataclass(frozen=True)
class AgentRecord:
    """One agent's status record as stored (bytes, not decoded) and its heartbeat.

    ``data`` is None where the record could not be read; ``problem`` says why.
    """

    agent_id: str
    data: bytes | None
    alive: bool
    problem: str | None = None


@dataclass(frozen=True)
class AgentRecords:
    """Every agent's record (by id), and what could not be read at all."""

    records: list[AgentRecord]
    problems: list[str]


def _wrong_type(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")


def _replies(replies: list[Any]) -> list[Any]:
    """Pipeline replies, raising any error but WRONGTYPE (a record's key of another type)."""
    for reply in replies:
        if isinstance(reply, Exception) and not _wrong_type(reply):
            raise reply
    return replies


def _record(agent_id: str, value: Any, size: Any, alive: bool, where: str) -> AgentRecord | None:
    """The record read for ``agent_id`` (size asked first), None if it expired meanwhile."""
    if _wrong_type(size) or _wrong_type(value):
        return AgentRecord(agent_id, None, alive, f"its {where} is not a string (WRONGTYPE)")
    if type(size) is int and size > MAX_STATUS_BYTES:
        problem = f"its record is {size} bytes, over the {MAX_STATUS_BYTES}-byte limit"
        return AgentRecord(agent_id, None, alive, problem)
    if value is None:
        return None
    return AgentRecord(agent_id, bytes(value), alive)
