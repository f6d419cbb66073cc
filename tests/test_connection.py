"""connect() for every URL form, and the one retry policy."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import pytest
import redis
import redis.cluster
import tenacity
import torch
from polling import until

from hotswap.agent import Agent
from hotswap.connection import (
    connect,
    operation_retry,
    reconnect_backoff,
    redact,
    retry_from_settings,
)
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError, StoreUnavailable
from hotswap.manifest import Manifest, TensorEntry, encode
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import Publisher, upkeep


def make_settings(url: str, **more: object) -> HotswapSettings:
    return HotswapSettings(redis_url=url, connect_timeout=0.5, _env_file=None, **more)  # type: ignore[call-arg]


def test_redis_url(server: EmbeddedRedis) -> None:
    c = connect(make_settings(server.url, socket_timeout=3.0))
    try:
        assert c.ping() is True
        kwargs = c.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 3.0
        assert kwargs["socket_connect_timeout"] == 0.5
        assert kwargs["socket_keepalive"] is True
        assert kwargs["port"] == server.port and kwargs["db"] == 0
    finally:
        c.close()


def test_database_number_in_the_url(server: EmbeddedRedis, client: redis.Redis) -> None:
    c = connect(make_settings(f"redis://127.0.0.1:{server.port}/3"))
    try:
        c.set("in-db-3", b"1")
        assert client.get("in-db-3") is None  # the fixture's client is on db 0
        assert c.get("in-db-3") == b"1"
    finally:
        c.flushdb()
        c.close()


@pytest.fixture
def socket_server() -> Iterator[tuple[EmbeddedRedis, str]]:
    with tempfile.TemporaryDirectory(prefix="hotswap-sock-") as tmp:
        path = os.path.join(tmp, "redis.sock")
        extra = ["--unixsocket", path, "--unixsocketperm", "700"]
        with EmbeddedRedis(extra_args=extra) as server:
            yield server, path


def test_unix_socket_url(socket_server: tuple[EmbeddedRedis, str]) -> None:
    server, path = socket_server
    c = connect(make_settings(f"unix://{path}"))
    try:
        assert c.ping() is True
        c.set("k", b"over the socket")
        assert c.connection_pool.connection_kwargs["path"] == path
        tcp = redis.Redis.from_url(server.url)
        assert tcp.get("k") == b"over the socket"
        tcp.close()
    finally:
        c.close()


def test_acl_user_and_password_url(socket_server: tuple[EmbeddedRedis, str]) -> None:
    server, _ = socket_server
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("hs", enabled=True, passwords=["+p4ss"], keys=["*"], commands=["+@all"])
    admin.close()
    c = connect(make_settings(f"redis://hs:p4ss@127.0.0.1:{server.port}/0"))
    try:
        assert c.acl_whoami() == "hs"
        assert Store(c, "m").head() is None
    finally:
        c.close()
    bad = connect(make_settings(f"redis://hs:nope@127.0.0.1:{server.port}/0"))
    with pytest.raises(ConfigError, match=r"^Redis refused the credentials while reading head: "):
        Store(bad, "m", retrying=operation_retry(3, 0.1)).head()
    bad.close()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "", "REDIS://x", "redis:/x"]
)
def test_bad_scheme_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        connect(make_settings(url))
    assert str(e.value) == (
        f"HOTSWAP_REDIS_URL {url!r} must start with redis://, rediss://, unix:// "
        "or redis+sentinel://"
    )


def test_messages_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as e:
        connect(make_settings("http://user:s3cret@host"))
    assert "s3cret" not in str(e.value) and "user:***@host" in str(e.value)
    with pytest.raises(ConfigError) as e:
        connect(make_settings("redis://user:s3cret@host:notaport/0"))
    assert str(e.value).startswith("invalid HOTSWAP_REDIS_URL 'redis://user:***@host:notaport/0': ")
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:p@h", "redis://:***@h"),
        ("redis://h:1", "redis://h:1"),
        ("rediss://u@h", "rediss://u@h"),
        ("unix:///tmp/s", "unix:///tmp/s"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_tls_url_passes_the_certificate_files() -> None:
    c = connect(
        make_settings(
            "rediss://127.0.0.1:6390/0",
            tls_ca_file="/etc/ca.pem",
            tls_cert_file="/etc/client.pem",
            tls_key_file="/etc/client.key",
        )
    )
    pool = c.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert pool.connection_kwargs["ssl_certfile"] == "/etc/client.pem"
    assert pool.connection_kwargs["ssl_keyfile"] == "/etc/client.key"
    c.close()


def test_cluster_over_unix_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        connect(make_settings("unix:///tmp/x.sock", cluster=True))
    assert str(e.value) == "Redis Cluster cannot be reached over a unix:// socket"


def test_cluster_flag_on_a_plain_server(server: EmbeddedRedis) -> None:
    with pytest.raises(ConfigError) as e:
        connect(make_settings(server.url, cluster=True))
    assert str(e.value) == (
        f"HOTSWAP_CLUSTER is set but {server.url} is not a Redis Cluster node; unset it"
    )


def test_unreachable_cluster_is_store_unavailable(server: EmbeddedRedis) -> None:
    with EmbeddedRedis() as gone:
        url = gone.url
    with pytest.raises(StoreUnavailable) as e:
        connect(make_settings(url, cluster=True))
    assert str(e.value).startswith(f"Redis Cluster at {url} unreachable (")
    assert str(e.value).endswith("; check HOTSWAP_REDIS_URL and the nodes")


@contextlib.contextmanager
def single_node_cluster() -> Iterator[EmbeddedRedis]:
    """A cluster of one node owning every slot: it refuses multi-key commands across slots."""
    with EmbeddedRedis(cluster=True) as node:
        admin = redis.Redis.from_url(node.url)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        up = until(
            lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"),
            attempts=200,
            pause=0.05,
        )
        assert up, "single-node cluster did not come up"
        admin.close()
        yield node


@pytest.mark.reliability
def test_store_works_unchanged_on_a_cluster() -> None:
    with single_node_cluster() as node:
        c = connect(make_settings(node.url, cluster=True))
        try:
            assert isinstance(c, redis.cluster.RedisCluster)
            store = Store(c, "m")
            entry = TensorEntry("w", "U8", (5,), 5, "ab" * 32, 2, 0.0, 0.0)
            store.blobs.upload(entry, memoryview(b"hello"))
            out = bytearray(5)
            store.blobs.read_into(entry, memoryview(out), 1)
            assert out == b"hello"
            v = store.reserve_version()
            m = Manifest("m", v, None, "ab" * 16, (entry,))
            store.commit(m, encode(m), {"version": v}, b"n")  # Lua: every key in one slot
            assert store.head() == v and store.versions() == [v]
            assert store.log()[0]["version"] == str(v)
        finally:
            c.close()


@pytest.mark.reliability
def test_publish_apply_and_gc_on_a_cluster_with_chunks_over_many_slots() -> None:
    # A blob's chunks hash to different slots: one EXISTS or UNLINK over them
    # is refused by a cluster ("all keys must map to the same key slot").
    with single_node_cluster() as node:
        s = make_settings(node.url, cluster=True, chunk_bytes=4096)
        source = {"a": torch.randn(10_000), "b": torch.randn(3)}
        live = {k: torch.zeros_like(t) for k, t in source.items()}
        pub = Publisher("m", settings=s)
        try:
            v1 = pub.publish(source)
            assert pub.last_report.bytes_uploaded == 40_012  # 10 chunks of "a", one of "b"
            with Agent(live, "m", settings=s) as agent:
                assert agent.wait_for(v1, 10)
                assert torch.equal(live["a"], source["a"])
                source["a"].add_(1.0)
                v2 = pub.publish(source, only=["a"])
                assert agent.wait_for(v2, 10)
                assert torch.equal(live["a"], source["a"])
            assert pub.verify(v2).ok
            report = pub.gc(keep=1)
            assert report.deleted_versions == [v1]
            # v1's "a" is younger than the grace period: kept until it is over.
            assert (report.blobs_deleted, report.blobs_kept_young) == (0, 1)
            report = upkeep.collect(pub.store, keep=1, grace=0.0)
            assert (report.blobs_deleted, report.chunks_deleted) == (1, 10)
            assert pub.store.blobs.missing(pub.store.manifest(v2).tensors) == []
        finally:
            pub.close()


# -- the retry policy ------------------------------------------------------------


def flaky(failures: int, error: BaseException) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return "ok"

    return calls, fn


@pytest.mark.parametrize(
    "error",
    [
        redis.ConnectionError("gone"),
        redis.TimeoutError("slow"),
        redis.exceptions.BusyLoadingError("loading"),
        ConnectionResetError("reset"),
    ],
)
def test_transient_errors_are_retried(error: BaseException) -> None:
    calls, fn = flaky(2, error)
    assert operation_retry(5, 0.01)(fn) == "ok"  # type: ignore[call-overload]
    assert len(calls) == 3


def test_retry_budget_then_the_last_error() -> None:
    calls, fn = flaky(100, redis.ConnectionError("still gone"))
    with pytest.raises(redis.ConnectionError, match="still gone"):
        operation_retry(4, 0.01)(fn)  # type: ignore[call-overload]
    assert len(calls) == 4


@pytest.mark.parametrize(
    "error",
    [redis.AuthenticationError("WRONGPASS"), redis.ResponseError("WRONGTYPE"), ValueError("x")],
)
def test_permanent_errors_are_not_retried(error: BaseException) -> None:
    calls, fn = flaky(1, error)
    with pytest.raises(type(error)):
        operation_retry(5, 0.01)(fn)  # type: ignore[call-overload]
    assert len(calls) == 1


def test_backoff_is_bounded() -> None:
    policy = operation_retry(10, 0.3)
    waits = []
    for attempt in range(1, 10):
        state = tenacity.RetryCallState(policy, fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        waits.append(policy.wait(state))
    assert all(0 <= w <= 0.3 for w in waits)
    wait = reconnect_backoff(1.5)
    state = tenacity.RetryCallState(policy, fn=None, args=(), kwargs={})
    state.attempt_number = 50
    assert 0 < wait(state) <= 1.5


def test_retry_from_settings_uses_the_attempts() -> None:
    calls, fn = flaky(100, redis.TimeoutError("t"))
    policy = retry_from_settings(make_settings("redis://x", retry_attempts=2, retry_max_wait=0.01))
    with pytest.raises(redis.TimeoutError):
        policy(fn)  # type: ignore[call-overload]
    assert len(calls) == 2
