"""Shared fixtures: one throwaway redis-server per session, flushed per test.

Never touches the Redis on port 6379.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.store import Store


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    assert server.port != 6379
    yield server
    server.stop()


@pytest.fixture
def server(redis_server: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """The session server, running and thawed (fault tests may kill or freeze it)."""
    redis_server.thaw()
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    yield redis_server
    redis_server.thaw()
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()


@pytest.fixture
def client(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url, socket_timeout=5)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def settings(server: EmbeddedRedis, client: redis.Redis) -> HotswapSettings:
    return HotswapSettings(
        redis_url=server.url,
        chunk_bytes=64 * 1024,
        poll_interval=0.5,
        retry_attempts=3,
        retry_max_wait=0.2,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def store(client: redis.Redis) -> Store:
    return Store(client, "m", retrying=operation_retry(3, 0.1))
