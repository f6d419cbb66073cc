"""WAIT for replicas: before a commit, for the blobs; after it, for the commit itself.

A publisher with ``HOTSWAP_WAIT_REPLICAS=N`` asks each master holding blobs
of the new version to confirm that N of its replicas hold them before it
commits, so that no agent reading from replicas is told about bytes a
replica lacks; and asks the master holding the model's metadata again after
the commit, so that a failover cannot lose a version already announced (nor
let a later publish reuse its number with other content).

Redis's ``WAIT numreplicas timeout`` counts the replicas holding *this
connection's* last write, and a connection that wrote nothing reports the
offset of when it connected. The blobs went over other connections, so each
WAIT follows, on one connection, a write that changes nothing: ``APPEND key
''`` on a key of the version, from a script that skips a missing key
(``APPEND`` would create it). The replication stream is in order, so a
replica holding that write holds everything its master wrote before it.

Falling short: before the commit, the commit is refused (``StoreUnavailable``;
nothing written, head unchanged); after it, the version stays committed and
the shortfall is logged and returned (``Replication.last``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.cluster

from hotswap import keys, transport
from hotswap.blobindex import stored_blobs
from hotswap.connection import RedisClient, guarded, operation_retry, retry_from_settings
from hotswap.errors import ConfigError, StoreUnavailable
from hotswap.manifest import TensorEntry
from hotswap.settings import HotswapSettings

log = logging.getLogger("hotswap.replication")

# A write that changes nothing, so that WAIT on this connection has an offset
# to wait for; -1 (and no write) where the key is gone.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('APPEND', KEYS[1], '')
"""
# The script's name for EVALSHA (SCRIPT LOAD answers the same), not a security use.
_TOUCH_SHA = hashlib.sha1(_TOUCH.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class WaitOutcome:
    """What one round of WAITs found.

    Attributes:
        what: "blobs" (before the commit) or "commit" (after it).
        wanted: replicas asked of each master (``HOTSWAP_WAIT_REPLICAS``).
        timeout_ms: how long each WAIT could take.
        acked: master address -> replicas that confirmed it.
        gone: masters whose key was missing (nothing there to wait for).
        failed: why the WAITs could not be asked at all (Redis away), if so.

    Example::

        outcome = replication.after_commit(store.ns, 7)
        if outcome is not None and not outcome.ok:
            print(outcome.describe())
    """

    what: str
    wanted: int
    timeout_ms: int
    acked: dict[str, int] = field(default_factory=dict)
    gone: tuple[str, ...] = ()
    failed: str | None = None

    @property
    def ok(self) -> bool:
        """Every master had ``wanted`` replicas confirm, and none lost its key."""
        if self.failed is not None or self.gone:
            return False
        return all(n >= self.wanted for n in self.acked.values())

    def describe(self) -> str:
        """One line: which masters fell short and by how much."""
        if self.failed is not None:
            return f"no replica could be asked about the {self.what} ({self.failed})"
        short = [f"{m}: {n} of {self.wanted}" for m, n in self.acked.items() if n < self.wanted]
        short += [f"{m}: its key is gone" for m in self.gone]
        return f"replicas confirmed the {self.what} within {self.timeout_ms} ms only on " + (
            "; ".join(short) or "every master"
        )


class Replication:
    """The WAITs of one publisher (``HOTSWAP_WAIT_REPLICAS``, ``HOTSWAP_WAIT_TIMEOUT_MS``).

    Args:
        client: the publisher's ``redis.Redis`` or ``RedisCluster``.
        model: the model's name, for messages.
        wanted: replicas each master must confirm (0: no WAIT at all).
        timeout_ms: the most one WAIT blocks.
        retrying: the retry policy (a master away is retried, as any write).

    Example::

        replication = Replication.of(client, "m", settings)
        replication.before_commit(ns, entries)  # raises if replicas fall short
        store.commit(...)
        replication.after_commit(ns, version)  # logs a shortfall, returns it
    """

    def __init__(
        self,
        client: RedisClient,
        model: str,
        wanted: int,
        timeout_ms: int,
        retrying: Any = None,
    ) -> None:
        self.client = client
        self.model = model
        self.wanted = wanted
        self.timeout_ms = timeout_ms
        self._retrying = retrying or operation_retry()
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self.last: WaitOutcome | None = None

    @classmethod
    def of(
        cls, client: RedisClient, model: str, settings: HotswapSettings, retrying: Any = None
    ) -> Replication:
        """The WAITs ``settings`` ask for.

        Raises:
            ConfigError: a WAIT could outlast ``HOTSWAP_SOCKET_TIMEOUT`` (the
                client would give up on the reply first).
        """
        if settings.wait_replicas and settings.wait_timeout_ms >= settings.socket_timeout * 1000:
            raise ConfigError(
                f"HOTSWAP_WAIT_TIMEOUT_MS={settings.wait_timeout_ms} must be under "
                f"HOTSWAP_SOCKET_TIMEOUT ({settings.socket_timeout:g} s): lower it, or "
                "raise the socket timeout"
            )
        retrying = retrying or retry_from_settings(settings)
        return cls(client, model, settings.wait_replicas, settings.wait_timeout_ms, retrying)

    def before_commit(self, ns: str, entries: Sequence[TensorEntry]) -> WaitOutcome | None:
        """WAIT on every master holding chunks of ``entries``; None when not configured.

        Raises:
            StoreUnavailable: fewer replicas than asked confirmed the blobs in
                time (nothing is committed; head is unchanged).
        """
        if not self.wanted:
            return None
        names = [
            k
            for e in entries
            if e.chunks
            for blob in stored_blobs(e)
            for k in keys.chunk_keys(ns, self.model, blob, e.chunk_bytes, e.chunks)
        ]
        outcome = self._wait("blobs", names)
        if not outcome.ok:
            raise StoreUnavailable(
                f"model {self.model!r}: not committed, {outcome.describe()}; nothing changed. "
                "Check the replicas (INFO replication), or lower HOTSWAP_WAIT_REPLICAS or "
                "raise HOTSWAP_WAIT_TIMEOUT_MS, and publish again"
            )
        return outcome

    def after_commit(self, ns: str, version: int) -> WaitOutcome | None:
        """WAIT on the master holding the model's metadata, after ``version`` was committed;
        a shortfall is logged and returned, not raised (the version is already live)."""
        if not self.wanted:
            return None
        try:
            outcome = self._wait("commit", [keys.manifest_key(ns, self.model, version)])
        except StoreUnavailable as e:  # the version stands either way: say so, not raise
            outcome = WaitOutcome("commit", self.wanted, self.timeout_ms, failed=str(e))
            self.last = outcome
        if not outcome.ok:
            log.warning(
                "model %r: v%d is committed and announced, but %s: a failover now could "
                "lose it; check the replicas (INFO replication)",
                self.model,
                version,
                outcome.describe(),
            )
        return outcome

    # -- the WAITs ----------------------------------------------------------------

    def _wait(self, what: str, names: Sequence[str]) -> WaitOutcome:
        def attempt() -> WaitOutcome:
            try:
                return self._wait_once(what, names)
            except (redis.exceptions.MovedError, redis.exceptions.AskError) as e:
                # A slot moved (failover, resharding): learn the map, then try again.
                transport.refresh_topology(self.client)
                raise redis.exceptions.TryAgainError(str(e)) from e

        outcome = guarded(self._retrying, self.model, f"waiting for replicas ({what})", attempt)
        self.last = outcome
        return outcome

    def _wait_once(self, what: str, names: Sequence[str]) -> WaitOutcome:
        acked: dict[str, int] = {}
        gone: list[str] = []
        for master, (node_client, key) in self._one_key_per_master(names).items():
            pipe = node_client.pipeline(transaction=False)
            pipe.script_load(_TOUCH)
            pipe.execute_command("EVALSHA", _TOUCH_SHA, 1, key)
            pipe.execute_command("WAIT", self.wanted, self.timeout_ms)
            _, touched, count = pipe.execute()
            if int(touched) < 0:
                gone.append(master)
            else:
                acked[master] = int(count)
        return WaitOutcome(what, self.wanted, self.timeout_ms, acked, tuple(gone))

    def _one_key_per_master(self, names: Sequence[str]) -> dict[str, tuple[RedisClient, str]]:
        """Each master holding one of ``names``, with a client of it and one such key."""
        if not names:
            return {}
        if not self._cluster:
            where = self.client.connection_pool.connection_kwargs
            # Sentinel's pool finds its address per connection: then it is just "the primary".
            name = (
                f"{where['host']}:{where.get('port', 6379)}" if "host" in where else "the primary"
            )
            return {name: (self.client, names[0])}
        out: dict[str, tuple[RedisClient, str]] = {}
        for name in names:
            node = self.client.get_node_from_key(name)
            if node.name not in out:
                out[node.name] = (self.client.get_redis_connection(node), name)
        return out
