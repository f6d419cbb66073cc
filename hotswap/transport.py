"""Blob chunks over a raw socket: zero-copy SET, and GET straight into a buffer.

Just enough RESP for SET and GET of chunks, on a socket borrowed from the
client's own connection pool (so address, TLS, ACL and db are the client's).
Failures surface as redis-py's exceptions, so ``blobs`` retries and maps both
paths alike. Why it exists and how it works: docs/design.md ("The chunk
transport"); what it gains: docs/performance.md ("Transport").
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
import redis.cluster
import redis.connection
from redis._parsers.base import BaseParser

Key = str | bytes

# -- redis-py adapter ----------------------------------------------------------
# Every use of redis-py beyond its documented client API is in this section,
# so that an upgrade breaks one place: tests/test_redis_adapter.py checks each
# piece and pyproject.toml pins the majors they hold on. Nothing below the
# section reaches into redis-py.

# Connection classes whose socket speaks plain RESP to one server.
_PLAIN = (
    redis.connection.Connection,
    redis.connection.SSLConnection,
    redis.connection.UnixDomainSocketConnection,
)


def plain_pool(client: Any) -> redis.ConnectionPool | None:
    """``client``'s pool if its connections are plain sockets to one server, else None
    (Redis Cluster, client-side caching, custom connection classes)."""
    if not isinstance(client, redis.Redis):
        return None
    pool = client.connection_pool
    if pool.connection_class not in _PLAIN or getattr(pool, "cache", None) is not None:
        return None
    return pool


def borrow(pool: redis.ConnectionPool) -> redis.connection.Connection:
    """A connected connection from ``pool`` (asked without a command name, as redis-py 6 wants)."""
    return pool.get_connection()


def connection_socket(conn: redis.connection.Connection) -> socket.socket:
    """The open socket of a connection taken from the pool (redis-py keeps it in ``_sock``)."""
    sock = getattr(conn, "_sock", None)
    if not isinstance(sock, socket.socket):
        raise redis.ConnectionError("Redis connection has no open socket")
    return sock


def reply_error(text: bytes) -> redis.RedisError:
    """The redis-py exception for an error reply's text (MOVED, ASK, NOAUTH, ...)."""
    return BaseParser.parse_error(text.decode(errors="replace"))  # type: ignore[no-untyped-call,no-any-return]


def node_for_key(cluster: redis.cluster.RedisCluster, key: Key) -> tuple[str, Any]:
    """The name of the cluster node owning ``key``'s slot, and its client (None if unset)."""
    node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
    return node.name, node.redis_connection


def refresh_topology(client: Any) -> None:
    """Make a cluster client learn the slot map again now (nothing for one server).

    A pub/sub connection that dies with its node asks redis-py for no refresh
    (only commands do), so a failover would leave the channel's slot pointing
    at the dead master. A refresh that reaches no node is left for the next
    attempt: the caller is already failing and will try again.
    """
    if isinstance(client, redis.cluster.RedisCluster):
        with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException, OSError):
            client.nodes_manager.initialize()


# -- the transport ----------------------------------------------------------------

MiB = 1024 * 1024
# GETs in flight on one socket: enough that the server always has the next
# request waiting; more only costs the server output-buffer memory. Set from
# the transport sweep (`python -m bench --tune`, docs/performance.md).
DEFAULT_WINDOW = 4
# Receive buffer for reply headers. A header recv may pull in the start of the
# next value, which is then copied once; small keeps that copy small.
SCRATCH_BYTES = 64 * 1024
# Pieces handed to one sendmsg call (the kernel accepts up to IOV_MAX = 1024).
SEND_PARTS = 48
CRLF = b"\r\n"


def _key_bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def get_command(key: Key) -> bytes:
    """The RESP encoding of ``GET key``."""
    return b"*2\r\n$3\r\nGET\r\n" + _bulk(_key_bytes(key))


def set_header(key: Key, nbytes: int) -> bytes:
    """The RESP encoding of ``SET key <value>`` up to the value's first byte."""
    return b"*3\r\n$3\r\nSET\r\n" + _bulk(_key_bytes(key)) + b"$%d\r\n" % nbytes


class _Reader:
    """Reads RESP replies from a socket; values go straight into caller buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(SCRATCH_BYTES)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _recv_into(self, view: memoryview) -> int:
        n = self.sock.recv_into(view)
        if n == 0:
            raise redis.ConnectionError("Connection closed by server.")
        return n

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            size = self.end - self.start
            if size == len(self.buf):
                raise redis.exceptions.InvalidResponse(
                    f"Redis reply line longer than {len(self.buf)} bytes"
                )
            self.buf[:size] = self.buf[self.start : self.end]
            self.start, self.end = 0, size
        self.end += self._recv_into(self.view[self.end :])

    def line(self) -> bytes:
        """One reply line without its CRLF."""
        while True:
            at = self.buf.find(CRLF, self.start, self.end)
            if at >= 0:
                text = bytes(self.buf[self.start : at])
                self.start = at + 2
                return text
            self._fill()

    def reply(self) -> bytes:
        """The first line of the next reply, past RESP3 push messages and attributes
        (out-of-band data this transport has no use for)."""
        while True:
            line = self.line()
            if line[:1] not in (b">", b"|"):
                return line
            self.skip_value(line)
            # An attribute annotates the reply after it; a push stands alone.

    def skip_value(self, line: bytes) -> None:
        """Consume the rest of the RESP2/RESP3 value whose first line is ``line``."""
        kind = line[:1]
        if kind in (b"$", b"!", b"="):
            size = int(line[1:])
            if size >= 0:
                self.skip(size + 2)
        elif kind in (b"*", b">", b"~", b"%", b"|"):
            count = int(line[1:]) * (2 if kind in (b"%", b"|") else 1)
            for _ in range(max(count, 0)):
                self.skip_value(self.line())

    def bulk(self, line: bytes) -> bytes:
        """The payload of a bulk reply (``$``/``!``) whose first line is ``line``."""
        size = int(line[1:])
        data = bytearray(size)
        self.into(memoryview(data), size)
        self.skip(2)
        return bytes(data)

    def into(self, out: memoryview, nbytes: int) -> None:
        """Exactly ``nbytes`` of the stream into ``out[:nbytes]``."""
        have = min(self.end - self.start, nbytes)
        if have:
            out[:have] = self.view[self.start : self.start + have]
            self.start += have
        pos = have
        while pos < nbytes:
            pos += self._recv_into(out[pos:nbytes])

    def skip(self, nbytes: int) -> None:
        while nbytes > 0:
            if self.start == self.end:
                self._fill()
            step = min(self.end - self.start, nbytes)
            self.start += step
            nbytes -= step


def _send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Send every piece, zero-copy where the socket allows it."""
    if isinstance(sock, ssl.SSLSocket):
        # SSLSocket has no sendmsg; TLS encrypts into its own records anyway.
        for part in parts:
            sock.sendall(part)
        return
    views = [memoryview(p).cast("B") for p in parts]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + SEND_PARTS])
        while sent and first < len(views):
            size = len(views[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0
        while first < len(views) and not len(views[first]):
            first += 1


def _reply_error(reader: _Reader, line: bytes) -> redis.RedisError | None:
    """The error a reply line carries (simple ``-`` or RESP3 bulk ``!``), else None."""
    if line[:1] == b"-":
        return reply_error(line[1:])
    if line[:1] == b"!":
        return reply_error(reader.bulk(line))
    return None


class BlobTransport:
    """SET and GET of blob chunks on sockets borrowed from a redis-py connection pool."""

    def __init__(self, pool: redis.ConnectionPool, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.pool = pool
        self.window = window

    @classmethod
    def for_client(cls, client: Any, window: int = DEFAULT_WINDOW) -> BlobTransport | None:
        """A transport over ``client``'s pool, or None where only redis-py's path applies
        (Redis Cluster, client-side caching, custom connection classes)."""
        pool = plain_pool(client)
        return None if pool is None else cls(pool, window)

    @contextlib.contextmanager
    def _socket(self) -> Iterator[socket.socket]:
        conn = borrow(self.pool)
        clean = False
        try:
            sock = connection_socket(conn)
            try:
                yield sock
            except TimeoutError as e:
                raise redis.TimeoutError(f"Timeout reading from Redis: {e}") from e
            except OSError as e:
                raise redis.ConnectionError(f"Error talking to Redis: {e}") from e
            clean = True
        finally:
            if not clean:
                # The stream's position is unknown: never hand it to anyone else.
                conn.disconnect()  # type: ignore[no-untyped-call]
            self.pool.release(conn)

    def set_chunks(self, keys: Sequence[Key], values: Sequence[memoryview]) -> None:
        """SET each key to its value (pipelined); raises the first error reply."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if not keys:
            return
        with self._socket() as sock:
            parts: list[bytes | memoryview] = []
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                view = memoryview(value).cast("B")
                # The previous value's CRLF rides in front of this header: fewer pieces.
                parts += [(CRLF if i else b"") + set_header(key, len(view)), view]
                if len(parts) >= SEND_PARTS:
                    _send_parts(sock, parts)
                    parts = []
            parts.append(CRLF)
            _send_parts(sock, parts)
            reader = _Reader(sock)
            error: redis.RedisError | None = None
            for _ in keys:
                line = reader.reply()
                failed = _reply_error(reader, line)
                if failed is not None:
                    error = error or failed
                elif line[:1] != b"+":
                    raise redis.exceptions.InvalidResponse(f"unexpected SET reply {line[:64]!r}")
        if error is not None:
            raise error

    def get_into(
        self,
        keys: Sequence[Key],
        outs: Sequence[memoryview],
        on_chunk: Callable[[int, int], None] | None = None,
        window: int | None = None,
    ) -> list[int | None]:
        """GET each key into its buffer; returns each value's length, None if absent.

        A value longer than its buffer fills it and the rest is discarded (its true
        length is returned, so the caller can tell). ``on_chunk(i, length)`` runs as
        soon as value ``i`` has landed, while later ones are still on the wire.
        ``window``: GETs in flight (default the transport's, sized for whole
        chunks); a caller reading many small values asks for them all at once.
        """
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys for {len(outs)} buffers")
        lengths: list[int | None] = [None] * len(keys)
        if not keys:
            return lengths
        error: redis.RedisError | None = None
        with self._socket() as sock:
            reader = _Reader(sock)
            asked = min(window or self.window, len(keys))
            sock.sendall(b"".join(get_command(k) for k in keys[:asked]))
            for i, out in enumerate(outs):
                line = reader.reply()
                if asked < len(keys):
                    # Ask for the next one before reading this value: the server
                    # works on it while this one crosses.
                    sock.sendall(get_command(keys[asked]))
                    asked += 1
                kind = line[:1]
                if kind == b"$":
                    size = int(line[1:])
                    if size < 0:
                        continue
                    view = memoryview(out).cast("B")
                    take = min(size, len(view))
                    reader.into(view, take)
                    reader.skip(size - take + 2)
                    lengths[i] = size
                    if on_chunk is not None:
                        on_chunk(i, size)
                elif kind == b"_":
                    continue  # RESP3 null: absent
                else:
                    failed = _reply_error(reader, line)
                    if failed is None:
                        raise redis.exceptions.InvalidResponse(
                            f"unexpected GET reply {line[:64]!r}"
                        )
                    error = error or failed
        if error is not None:
            raise error
        return lengths


class NotApplicable(Exception):
    """This client or key cannot take the fast path: use redis-py's."""


# When to take redis-py's path instead: a node this module cannot talk to
# (NotApplicable), or a key that lives elsewhere now (MOVED, ASK: slots
# migrating), which redis-py's cluster client follows.
REDIRECTED: tuple[type[Exception], ...] = (
    NotApplicable,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
)


class ChunkIO:
    """The fast path for any client: one ``BlobTransport`` per server, and on a
    Redis Cluster each key through the node that owns its slot.

    A MOVED or ASK reply (slots migrating) surfaces as redis-py's MovedError or
    AskError, a node without a plain connection as NotApplicable; on any of
    ``REDIRECTED`` the caller takes redis-py's path, which follows redirections.
    """

    def __init__(self, client: Any, window: int = DEFAULT_WINDOW) -> None:
        self.client = client
        self.window = window
        self._single = BlobTransport.for_client(client, window)
        self._nodes: dict[str, BlobTransport | None] = {}

    @classmethod
    def of(cls, client: Any, window: int = DEFAULT_WINDOW) -> ChunkIO | None:
        """A ChunkIO for ``client``, or None where only redis-py's path applies."""
        if isinstance(client, redis.cluster.RedisCluster) or (
            BlobTransport.for_client(client, window) is not None
        ):
            return cls(client, window)
        return None

    def _groups(self, keys: Sequence[Key]) -> list[tuple[BlobTransport, list[int]]]:
        if self._single is not None:
            return [(self._single, list(range(len(keys))))]
        groups: dict[str, tuple[BlobTransport, list[int]]] = {}
        for i, key in enumerate(keys):
            name, node_client = node_for_key(self.client, key)
            if name not in self._nodes:
                self._nodes[name] = (
                    BlobTransport.for_client(node_client, self.window)
                    if node_client is not None
                    else None
                )
            transport = self._nodes[name]
            if transport is None:
                raise NotApplicable(f"cluster node {name} has no plain connection")
            groups.setdefault(name, (transport, []))[1].append(i)
        return list(groups.values())

    def set_chunks(self, keys: Sequence[Key], values: Sequence[memoryview]) -> None:
        for transport, indices in self._groups(keys):
            transport.set_chunks([keys[i] for i in indices], [values[i] for i in indices])

    def get_into(
        self,
        keys: Sequence[Key],
        outs: Sequence[memoryview],
        on_chunk: Callable[[int, int], None] | None = None,
        window: int | None = None,
    ) -> list[int | None]:
        """``BlobTransport.get_into`` over every node; ``on_chunk`` gets indices into
        ``keys`` (in order on one server, in order per node on a cluster)."""
        lengths: list[int | None] = [None] * len(keys)
        for transport, indices in self._groups(keys):

            def landed(j: int, n: int, indices: list[int] = indices) -> None:
                if on_chunk is not None:
                    on_chunk(indices[j], n)

            got = transport.get_into(
                [keys[i] for i in indices],
                [outs[i] for i in indices],
                on_chunk=None if on_chunk is None else landed,
                window=window,
            )
            for i, n in zip(indices, got, strict=True):
                lengths[i] = n
        return lengths
