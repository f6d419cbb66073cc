"""What hotswap.transport's redis-py adapter needs from redis-py, checked one by one.

The transport borrows sockets from redis-py's pool and reuses its error
parser: that reaches past redis-py's documented API, so a redis-py upgrade may
take something away. Each test here names the piece; when one fails, update
the adapter section at the top of hotswap/transport.py (and the redis pin in
pyproject.toml) before allowing that redis-py version.
"""

from __future__ import annotations

import importlib
import inspect
import socket
from collections.abc import Callable
from types import ModuleType

import pytest
import redis
import redis.cluster
import redis.connection

from hotswap.embedded import EmbeddedRedis


def need(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(
            f"redis-py {redis.__version__} lacks {what}, which the redis-py adapter at the "
            "top of hotswap/transport.py uses: update the adapter, or keep this version out "
            "of the redis pin in pyproject.toml",
            pytrace=False,
        )


@pytest.fixture
def adapter() -> ModuleType:
    try:
        return importlib.import_module("hotswap.transport")
    except (ImportError, AttributeError) as e:
        need(False, f"what hotswap.transport imports ({e})")
        raise


def test_error_parser_is_there() -> None:
    try:
        base = importlib.import_module("redis._parsers.base")
    except ImportError:
        base = None
    need(base is not None, "the module redis._parsers.base")
    parser = getattr(base, "BaseParser", None)
    need(
        callable(getattr(parser, "parse_error", None)), "redis._parsers.base.BaseParser.parse_error"
    )


def test_error_replies_become_redis_py_exceptions(adapter: ModuleType) -> None:
    for text, kind in [
        (b"MOVED 3999 127.0.0.1:6381", redis.exceptions.MovedError),
        (b"ASK 3999 127.0.0.1:6381", redis.exceptions.AskError),
        (b"NOPERM no rights", redis.exceptions.NoPermissionError),
        (b"WRONGTYPE wrong kind", redis.exceptions.ResponseError),
    ]:
        error = adapter.reply_error(text)
        need(
            isinstance(error, kind),
            f"BaseParser.parse_error mapping {text!r} to {kind.__name__} (got {error!r})",
        )


def test_plain_connection_classes_are_there() -> None:
    for name in ("Connection", "SSLConnection", "UnixDomainSocketConnection"):
        need(inspect.isclass(getattr(redis.connection, name, None)), f"redis.connection.{name}")


def callable_without_arguments(fn: Callable[..., object]) -> bool:
    try:
        inspect.signature(fn).bind()
    except (TypeError, ValueError):
        return False
    return True


def test_a_pooled_connection_lends_its_socket(adapter: ModuleType, client: redis.Redis) -> None:
    pool = adapter.plain_pool(client)
    need(pool is client.connection_pool, "ConnectionPool.connection_class of a plain client")
    need(
        callable_without_arguments(pool.get_connection),
        "ConnectionPool.get_connection() without a command name",
    )
    conn = adapter.borrow(pool)
    try:
        need(isinstance(getattr(conn, "_sock", None), socket.socket), "Connection._sock")
        assert adapter.connection_socket(conn) is conn._sock
    finally:
        pool.release(conn)


def test_client_side_caching_is_recognised(adapter: ModuleType, server: EmbeddedRedis) -> None:
    # A client that caches replies must not take the fast path (it would miss
    # the invalidations); the adapter tells it by its pool's cache.
    cache = pytest.importorskip("redis.cache", reason="this redis-py has no client-side caching")
    cached = redis.Redis.from_url(server.url, protocol=3, cache_config=cache.CacheConfig())
    try:
        need(hasattr(cached.connection_pool, "cache"), "ConnectionPool.cache")
        need(adapter.plain_pool(cached) is None, "ConnectionPool.cache of a caching client")
    finally:
        cached.close()


def test_cluster_nodes_name_their_client() -> None:
    need(
        callable(getattr(redis.cluster.RedisCluster, "get_node_from_key", None)),
        "RedisCluster.get_node_from_key",
    )
    node = redis.cluster.ClusterNode("127.0.0.1", 1)
    need(node.name == "127.0.0.1:1", "ClusterNode.name as host:port")
    need(hasattr(node, "redis_connection"), "ClusterNode.redis_connection")


def test_cluster_topology_can_be_refreshed() -> None:
    """``refresh_topology``: a cluster client re-reads the slot map on demand."""
    need(
        callable(getattr(redis.cluster.NodesManager, "initialize", None)),
        "NodesManager.initialize",
    )
    need(
        "nodes_manager" in inspect.getsource(redis.cluster.RedisCluster.__init__),
        "RedisCluster.nodes_manager",
    )
