"""Blob chunks read from replicas, with every chunk a replica cannot serve read from its primary.

A blob's keys name its content (``keys.blob_key``), so a replica can be
behind its primary but never wrong: a chunk it holds is the chunk, and one it
lacks (not replicated yet) or cannot serve (away, MOVED, a wrong length) is
read again from the primary, by ``BlobStore``'s own path, and counted. Head,
manifests and everything else an agent reads come from primaries.

Where the replicas are:

- a Redis Cluster (``HOTSWAP_CLUSTER``): the cluster's own, through a second
  cluster client with redis-py's ``LoadBalancingStrategy.ROUND_ROBIN_REPLICAS``
  (its connections send ``READONLY``), used for blob chunks only;
- a single primary: ``HOTSWAP_REPLICA_URLS``, taken in turn;
- Sentinel: ``hotswap.sentinel.replica_client(settings)`` where that module
  exists (``slave_for``).

Replica clients connect at the first read (the cluster's, which learns the
slot map as it is built, is built then too), so an agent that never fetches
never connects to a replica, and a bad ``HOTSWAP_REPLICA_URLS`` entry is a
``ConfigError`` when the agent is made.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from hotswap import transport
from hotswap.blobwrite import PIPELINE_BYTES, chunk_span
from hotswap.connection import RedisClient
from hotswap.errors import ConfigError
from hotswap.manifest import TensorEntry
from hotswap.redact import redact, scrub
from hotswap.settings import HotswapSettings

# After a replica fails (away, frozen, refusing), chunks go to primaries for
# this long before replicas are tried again: a frozen replica would otherwise
# cost a socket timeout on every batch of every tensor.
REST_SECONDS = 5.0
# Each failure in a row doubles the rest, up to this: a frozen replica holds a
# read for a whole socket timeout each time it is tried again.
MAX_REST_SECONDS = 60.0
# What a replica read may fail with; none of it reaches the caller.
_REPLICA_FAILURES: tuple[type[BaseException], ...] = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)
Landed = Callable[[int, int], None]


def _ignore(j: int, length: int) -> None:
    """A ``Landed`` for reads that tell nobody as values land."""


@dataclass
class ReplicaCounts:
    """What replica reads did, for a report or a metric (one object per reader).

    Attributes:
        chunks: chunks a replica served.
        bytes: their bytes.
        fallbacks: chunks read from the primary instead (missing on the
            replica, the wrong length, or the replica failed).
        failures: replica reads that failed as a whole (then primaries only
            for ``REST_SECONDS``, doubled for each failure in a row).
    """

    chunks: int = 0
    bytes: int = 0
    fallbacks: int = 0
    failures: int = 0


def runs(indices: Sequence[int]) -> list[range]:
    """Ascending ``indices`` as runs of consecutive ones: ``[1, 2, 3, 7] -> [1-3, 7]``."""
    out: list[range] = []
    for _, group in itertools.groupby(enumerate(indices), lambda p: p[1] - p[0]):
        members = [i for _, i in group]
        out.append(range(members[0], members[-1] + 1))
    return out


class ReplicaReads:
    """Reads of blob chunks from replicas for one ``BlobStore`` (``BlobStore.replicas``).

    Args:
        open_client: builds the replica read client at the first read: a
            ``redis.Redis`` (one replica), a list of them (taken in turn) or a
            ``RedisCluster`` whose load balancing reads from replicas.

    Example::

        store.blobs.replicas = ReplicaReads.of(client, settings)  # None: off
        store.blobs.read_into(entry, out)  # replicas first, primaries for the rest
        print(store.blobs.replicas.counts.fallbacks)
    """

    def __init__(self, open_client: Callable[[], RedisClient | list[RedisClient]]) -> None:
        self._open = open_client
        self._clients: list[RedisClient] | None = None
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._resting_until = 0.0
        self._in_row = 0  # replica reads failed in a row
        self._refreshed_at = time.monotonic()  # a new client has just learned the map
        self.counts = ReplicaCounts()

    @classmethod
    def of(cls, client: RedisClient, settings: HotswapSettings) -> ReplicaReads | None:
        """Replica reads as ``settings`` ask (None: ``read_from_replicas`` off).

        Raises:
            ConfigError: replica reads are on for a single primary but no
                replica is named (``HOTSWAP_REPLICA_URLS``, or Sentinel).
        """
        if not settings.read_from_replicas:
            return None
        if isinstance(client, redis.cluster.RedisCluster):
            return cls(lambda: _cluster_reader(client))
        # Built now, so that a bad URL is refused at once; neither connects before a read.
        urls = [u.strip() for u in (settings.replica_urls or "").split(",") if u.strip()]
        if urls:
            clients = [_replica_client(u, settings) for u in urls]
            return cls(lambda: clients)
        sentinel = _sentinel_replica(settings)
        if sentinel is not None:
            return cls(lambda: sentinel)
        raise ConfigError(
            "HOTSWAP_READ_FROM_REPLICAS is on, but this Redis is one server and no replica "
            "is named: set HOTSWAP_REPLICA_URLS (comma-separated), or turn it off"
        )

    def close(self) -> None:
        """Close the replica clients this reader opened (a cluster reader's included)."""
        with self._lock:
            clients, self._clients = self._clients or [], None
        for c in clients:
            with contextlib.suppress(*_REPLICA_FAILURES):
                c.close()

    def read(
        self,
        entry: TensorEntry,
        chunks: range,
        out: memoryview,
        names: Sequence[str],
        on_chunk: Callable[[int, int], None] | None,
    ) -> list[range]:
        """Chunks ``chunks`` of ``entry`` from replicas into ``out`` (which starts where
        the first one does); ``on_chunk(i, length)`` for each of the right length.

        Returns:
            The runs of chunks still to read from the primary: those a replica
            lacks or served with a wrong length, or all of them where the
            replicas failed or are resting. Never raises for a replica's fault.
        """
        if time.monotonic() < self._resting_until:
            self.counts.fallbacks += len(chunks)
            return [chunks] if len(chunks) else []
        base = chunk_span(entry, chunks.start)[0]
        spans = [chunk_span(entry, i) for i in chunks]
        views = [out[s - base : e - base] for s, e in spans]
        told: set[int] = set()

        def landed(j: int, n: int) -> None:  # only a chunk of the right length is "in out"
            if on_chunk is not None and n == len(views[j]):
                told.add(j)
                on_chunk(chunks.start + j, n)

        try:
            lengths = self._get_into(names, views, landed)
            self._in_row = 0
        except _REPLICA_FAILURES:
            self._rest()
            lengths = [None] * len(views)
        again: list[int] = []
        for j, got in enumerate(lengths):
            if got != len(views[j]):
                again.append(chunks.start + j)
                continue
            self.counts.chunks += 1
            self.counts.bytes += got
            if on_chunk is not None and j not in told:
                on_chunk(chunks.start + j, got)
        self.counts.fallbacks += len(again)
        return runs(again)

    def read_capped(
        self, names: Sequence[str], caps: Sequence[int], buf: memoryview
    ) -> list[tuple[memoryview, int] | None]:
        """Values of ``names`` from replicas into consecutive slots of ``buf``, one of
        ``caps[i]`` bytes each (``BlobStore.get_capped``: delta frames, small blobs).

        Returns:
            Per name, its value and length, or None where the primary must be
            asked: absent on the replica, over its cap, or the replicas failed
            or are resting. Never raises for a replica's fault.
        """
        if time.monotonic() < self._resting_until:
            self.counts.fallbacks += len(names)
            return [None] * len(names)
        ends = list(itertools.accumulate(caps))
        slots = [buf[e - c : e] for e, c in zip(ends, caps, strict=True)]
        try:
            lengths = self._get_into(names, slots, _ignore)
            self._in_row = 0
        except _REPLICA_FAILURES:
            self._rest()
            lengths = [None] * len(names)
        out: list[tuple[memoryview, int] | None] = []
        for slot, n in zip(slots, lengths, strict=True):
            if n is None or n > len(slot):
                self.counts.fallbacks += 1
                out.append(None)
                continue
            self.counts.chunks += 1
            self.counts.bytes += n
            out.append((slot[:n], n))
        return out

    def _rest(self) -> None:
        self.counts.failures += 1
        self._in_row += 1
        rest = min(REST_SECONDS * 2 ** (self._in_row - 1), MAX_REST_SECONDS)
        self._resting_until = time.monotonic() + rest

    # -- the read client --------------------------------------------------------

    def _next_client(self) -> RedisClient:
        with self._lock:
            if self._clients is None:
                opened = self._open()
                self._clients = opened if isinstance(opened, list) else [opened]
            return self._clients[next(self._turn) % len(self._clients)]

    def _refresh_soon(self, client: redis.cluster.RedisCluster) -> None:
        now = time.monotonic()
        if now >= self._refreshed_at + REST_SECONDS:
            self._refreshed_at = now
            transport.refresh_topology(client)

    def _get_into(
        self, names: Sequence[str], views: Sequence[memoryview], landed: Landed
    ) -> list[int | None]:
        """Each value's length (None: absent or not served by a replica), landed in ``views``;
        ``landed(j, length)`` as value ``j`` lands (where the zero-copy path reads it)."""
        client = self._next_client()
        if not isinstance(client, redis.cluster.RedisCluster):
            return _get_from(client, names, views, landed)
        lengths: list[int | None] = [None] * len(names)
        groups: dict[str, tuple[RedisClient, list[int]]] = {}
        nodes = client.nodes_manager
        for j, name in enumerate(names):
            node = nodes.get_node_from_slot(
                client.keyslot(name),  # type: ignore[no-untyped-call]
                load_balancing_strategy=client.load_balancing_strategy,
            )
            if node.server_type != redis.cluster.REPLICA:
                # No replica serves this slot as far as this client knows (it may have
                # learned the map before the replicas joined): the primary's path
                # reads it, and the map is learned again, at most once a rest.
                self._refresh_soon(client)
                continue
            groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(j)
        for node_client, members in groups.values():

            def told(k: int, n: int, members: list[int] = members) -> None:
                landed(members[k], n)

            mine = [views[j] for j in members]
            try:
                got = _get_from(node_client, [names[j] for j in members], mine, told)
            except _REPLICA_FAILURES:
                # A replica away, promoted or moved (MOVED): learn the map again.
                self._refresh_soon(client)
                raise
            for j, n in zip(members, got, strict=True):
                lengths[j] = n
        return lengths


def _get_from(
    client: RedisClient, names: Sequence[str], views: Sequence[memoryview], landed: Landed
) -> list[int | None]:
    """GET ``names`` from one server into ``views``: zero-copy where it applies."""
    fast = transport.BlobTransport.for_client(client, transport.DEFAULT_WINDOW)
    if fast is not None:
        return fast.get_into(names, views, landed)
    lengths: list[int | None] = []
    for batch in _batches([len(v) for v in views]):
        pipe = client.pipeline(transaction=False)
        for j in batch:
            pipe.get(names[j])
        for j, value in zip(batch, pipe.execute(), strict=True):
            if value is not None and len(value) <= len(views[j]):
                views[j][: len(value)] = value  # a shorter one is the caller's to refuse
            lengths.append(None if value is None else len(value))
    return lengths


def _batches(sizes: Sequence[int]) -> Iterator[range]:
    """Consecutive runs of ``sizes`` of at most ``PIPELINE_BYTES`` each (at least one
    item): redis-py's replies of one round trip are held in memory together."""
    start = total = 0
    for j, size in enumerate(sizes):
        if j > start and total + size > PIPELINE_BYTES:
            yield range(start, j)
            start, total = j, 0
        total += size
    if start < len(sizes):
        yield range(start, len(sizes))


def _cluster_reader(primary: redis.cluster.RedisCluster) -> redis.cluster.RedisCluster:
    """A cluster client like ``primary`` (same nodes, credentials, TLS, timeouts) that
    reads from replicas: its connections send READONLY, its reads go round the replicas."""
    kwargs: dict[str, Any] = dict(primary.nodes_manager.connection_kwargs)
    kwargs.pop("redis_connect_func", None)  # the primary's READONLY-less hook
    kwargs.pop("db", None)  # always 0 on a cluster, and refused there as an argument
    seeds = [
        redis.cluster.ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
        for n in primary.get_nodes()  # type: ignore[no-untyped-call]
    ]
    return redis.cluster.RedisCluster(
        startup_nodes=seeds,
        load_balancing_strategy=redis.cluster.LoadBalancingStrategy.ROUND_ROBIN_REPLICAS,
        **kwargs,
    )


def _replica_client(url: str, settings: HotswapSettings) -> redis.Redis:
    """A client of one replica named in ``HOTSWAP_REPLICA_URLS``, connected as
    ``connection.connect`` connects to the primary (timeouts, TLS, no redis-py retries)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"HOTSWAP_REPLICA_URLS entry {redact(url)!r} must start with "
            "redis://, rediss:// or unix://"
        )
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith("rediss://"):
        for name, value in (
            ("ssl_ca_certs", settings.tls_ca_file),
            ("ssl_certfile", settings.tls_cert_file),
            ("ssl_keyfile", settings.tls_key_file),
        ):
            if value:
                kwargs[name] = value
    try:
        return redis.Redis.from_url(url, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"invalid HOTSWAP_REPLICA_URLS entry {redact(url)!r}: {scrub(str(e), url)}"
        ) from e


def _sentinel_replica(settings: HotswapSettings) -> RedisClient | None:
    """Sentinel's replica client (``slave_for``) where the settings name a Sentinel
    deployment (``hotswap.sentinel``); None otherwise."""
    try:
        sentinel: Any = importlib.import_module("hotswap.sentinel")
    except ImportError:  # a build without Sentinel support
        return None
    if not sentinel.configured(settings):
        return None
    return sentinel.replica_client(settings)
