"""The main process's handles on its helper processes: the worker (serving side) and a bare
notice listener, both over JSON lines."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


class WorkerError(RuntimeError):
    pass


def serve(
    commands: dict[str, Callable[..., Any]],
    emit: Callable[[dict[str, Any]], None],
    finish: Callable[[], Any],
) -> None:
    """A worker process's loop: run each JSON-lines command from stdin and emit its
    reply (or its error) until ``quit`` or the end of input, then ``finish()``."""
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            break
        try:
            emit({"reply": cmd, "result": commands[cmd](**request)})
        except Exception as e:
            emit({"reply": cmd, "error": f"{type(e).__name__}: {e}"})
    finish()


class WorkerProc:
    """Starts ``python -m bench.worker``; ``call`` runs a command, ``event`` waits for one."""

    def __init__(self, module: str = "bench.worker") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            (self.replies if "reply" in message else self.events).put(message)
        self.replies.put({"reply": "<exit>", "error": "worker exited"})
        self.events.put({"event": "error", "error": "worker exited"})

    def call(self, cmd: str, timeout: float = 300.0, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(f"worker did not answer {cmd!r} within {timeout}s") from None
        if "error" in reply:
            raise WorkerError(f"worker failed {cmd!r}: {reply['error']}")
        return reply.get("result")

    def event(self, kind: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next event of ``kind``; earlier events of other kinds are dropped."""
        while True:
            try:
                ev = self.events.get(timeout=timeout)
            except queue.Empty:
                raise WorkerError(f"no {kind!r} event from the worker within {timeout}s") from None
            if ev["event"] == "error":
                raise WorkerError(f"worker: {ev['error']}")
            if ev["event"] == kind:
                return ev

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> WorkerProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Listener:
    """``python -m bench.listener``: notice arrival times, keyed by channel and payload."""

    def __init__(self, url: str, pattern: str = "*") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.listener", url, pattern],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._heard: dict[tuple[str, bytes], float] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30):
            raise WorkerError("notice listener did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self._ready.set()
                continue
            with self._cond:
                key = (message["channel"], bytes.fromhex(message["data"]))
                self._heard.setdefault(key, message["t"])
                self._cond.notify_all()

    def when(self, channel: str, match: Callable[[bytes], bool], timeout: float = 60.0) -> float:
        """When the first message on ``channel`` whose payload ``match``es arrived
        (waits for it; each message is handed out once)."""

        def found() -> tuple[str, bytes] | None:
            return next((k for k in self._heard if k[0] == channel and match(k[1])), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise WorkerError(f"no matching notice on {channel} within {timeout}s")
            key = found()
            assert key is not None
            return self._heard.pop(key)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
