"""Redis I/O of one model's metadata: versions, manifests, commit, log, agents, notices.

Tensor content (blobs) is ``hotswap.blobs``'s: ``Store.blobs`` is a
``BlobStore`` on the same client, namespace and retry policy. Every operation
runs under ``connection.guarded`` (one tenacity policy, lasting connection
failures become ``StoreUnavailable``). Nothing here decides policy; the
publisher and the agent do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import tenacity

from hotswap import keys, scripts
from hotswap.agentrecords import (
    AGENT_RECORD_LINGER,
    MAX_AGENT_RECORDS,
    AgentRecord,
    AgentRecordIO,
    AgentRecords,
)
from hotswap.blobs import BlobStore
from hotswap.connection import RedisClient, guarded, operation_retry, retry_from_settings
from hotswap.errors import FormatError, NotFound, VersionConflict
from hotswap.manifest import EntryCache, Limits, Manifest, decode
from hotswap.pins import STABLE, Following, PinIO
from hotswap.settings import HotswapSettings
from hotswap.status import MAX_STATUS_BYTES
from hotswap.subscription import Subscription, notice_mode

__all__ = [
    "AGENT_RECORD_LINGER",
    "DEFAULT_LIMITS",
    "LOG_MAXLEN",
    "MAX_AGENT_RECORDS",
    "MAX_STATUS_BYTES",
    "AgentRecord",
    "AgentRecords",
    "Store",
    "Subscription",
]

T = TypeVar("T")
DEFAULT_LIMITS = Limits()
LOG_MAXLEN = 10_000


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
        self._commit_script = client.register_script(scripts.COMMIT)
        self._promote_script = client.register_script(scripts.PROMOTE)
        self._reserve_script = client.register_script(scripts.RESERVE)
        self._resign_script = client.register_script(scripts.RESIGN)
        self.blobs = BlobStore(client, self.model, namespace=self.ns, retrying=self._retrying)
        self.records = AgentRecordIO(client, self.model, self.ns, self.call)
        # Rollout pins (``hotswap.pins``): read with head, by agents.
        self.pins = PinIO(self)

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

    def following(self, agent_id: str, track: str = STABLE) -> Following:
        """Head and the rollout pin that holds for this agent or its track, in one round
        trip: what an agent without signing keys follows (``hotswap.pins``)."""
        return self.pins.read(agent_id, track)

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
        *,
        promote: bool = True,
    ) -> None:
        """Store ``manifest`` and make it head if head is still its parent (atomic, one script).

        ``record`` (a signed ``hotswap.headrecord``) is written with head;
        None deletes the one there, which would name an older head. With
        ``promote`` False the manifest and its log entry are stored under the
        same checks, and head, record and notice are left alone (``promote``).

        Raises VersionConflict (and writes nothing) if head moved.
        """
        version, parent = manifest.version, manifest.parent
        args = self._script_args(
            manifest, manifest_bytes, log_fields, notice, record, promote=promote
        )
        status, head = self.call(
            f"committing v{version}",
            lambda: self._commit_script(keys=self._script_keys(version), args=args),
        )
        if status == b"ok":
            return
        head_text = head.decode() or "none"
        # Only this script writes manifests, and V is ours (INCR): if manifest:V
        # holds our bytes, an earlier attempt committed before its reply was
        # lost, even if another publish has moved head on since.
        if self._stored_equals(version, manifest_bytes):
            return
        raise scripts.commit_refused(self.model, version, parent, status, head_text)

    def promote(
        self,
        manifest: Manifest,
        log_fields: dict[str, str | int | float],
        notice: bytes,
        record: bytes | None = None,
    ) -> bool:
        """Make stored ``manifest`` head if head is still its parent (atomic, one script),
        writing head, ``record``, a log entry and ``notice`` as ``commit`` does. True if
        this call moved head, False if the version already was head (nothing written).

        Raises VersionConflict (head moved on) or NotFound (manifest collected).
        """
        version, parent = manifest.version, manifest.parent
        args = self._script_args(manifest, b"", log_fields, notice, record, promote=True)
        status, head = self.call(
            f"promoting v{version}",
            lambda: self._promote_script(keys=self._script_keys(version), args=args),
        )
        if status in (b"ok", b"already"):
            return bool(status == b"ok")
        if status == b"missing":
            raise NotFound(
                f"model {self.model!r} has no version {version} to promote (collected by gc?)"
            )
        now = "empty" if not head else f"v{head.decode()}"
        was = "no version" if parent is None else f"v{parent}"
        raise VersionConflict(
            f"model {self.model!r}: cannot promote v{version}: head is {now}, not {was} that "
            f"v{version} was published on top of; a newer publish or a rollback moved head, "
            f"so v{version} is superseded: publish its weights again on top of {now}"
        )

    def _script_keys(self, version: int) -> list[str]:
        return [
            self._key(keys.head_key),
            self._key(keys.manifest_key, version),
            self._key(keys.log_key),
            self._key(keys.head_record_key),
        ]

    def _script_args(
        self,
        manifest: Manifest,
        data: bytes,
        log_fields: dict[str, str | int | float],
        notice: bytes,
        record: bytes | None,
        *,
        promote: bool,
    ) -> list[str | int | float | bytes]:
        """ARGV of ``scripts.COMMIT`` and ``scripts.PROMOTE``."""
        args: list[str | int | float | bytes] = [
            "" if manifest.parent is None else str(manifest.parent),
            str(manifest.version),
            data,
            self._key(keys.events_channel),
            notice,
            LOG_MAXLEN,
            record or b"",
            notice_mode(self.client),
            "1" if promote else "0",
        ]
        for name, value in log_fields.items():
            args += [name, value]
        return args

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

    # -- agents (``AgentRecordIO``) ------------------------------------------------

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        self.records.write(agent_id, record, ttl)

    def remove_agent(self, agent_id: str) -> None:
        self.records.remove(agent_id)

    def agent_records(self) -> list[tuple[str, bytes, bool]]:
        return self.records.all()

    def agent_report(self) -> AgentRecords:
        return self.records.report()

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
