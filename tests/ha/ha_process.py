"""A worker script run in its own process for the high-availability tests, a watch on an
agent's heartbeat key, and the probe model's versions: shared by the cluster, Sentinel
and sharded-notice modules.

The worker prints one event a line (``READY <agent id>``, ``APPLIED <version>
<monotonic>``, ..., and a JSON summary last); ``wait`` finds one, old or new.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.exceptions
import torch
from serving_worker import Probe, fill

from hotswap.errors import StoreUnavailable
from hotswap.store import Store
from publisher import Publisher

ROOT = Path(__file__).resolve().parents[2]


class EventWorker:
    """``python SCRIPT ARGS...`` in its own process; its event lines land in ``seen``."""

    def __init__(self, script: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[list[str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.agent_id = self.wait(lambda e: e[0] == "READY")[1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait(self, match: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        """The first event (old or new) that ``match`` accepts; fails after ``timeout``."""
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"worker never reported it; saw {self.seen[-10:]}") from None
            event = line.split()
            self.seen.append(event)
            if match(event):
                return event

    def applied(self, version: int, timeout: float = 60.0) -> float:
        """When (monotonic) the worker applied ``version``."""
        return float(self.wait(lambda e: e[:2] == ["APPLIED", str(version)], timeout)[2])

    def finish(self) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        self._reader.join(10)
        while not self.lines.empty():
            self.seen.append(self.lines.get().split())
        result: dict[str, object] = json.loads(" ".join(self.seen[-1]))
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


class HeartbeatWatch:
    """Reads an agent's heartbeat key over and over through a client of its own: every
    read that reached Redis must find it (reads a failover refused do not count)."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self.missing: list[float] = []
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                found = self.client.exists(self.key)
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                self.stop.wait(0.05)
                continue
            self.reads += 1
            if not found:
                self.missing.append(time.monotonic())
            self.stop.wait(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.client.close()


def state(version: int) -> dict[str, torch.Tensor]:
    """The probe model's content for ``version`` (``serving_worker.fill``)."""
    s = {k: t.clone() for k, t in Probe().state_dict().items()}
    fill(s, version)
    return s


def content_of(store: Store, version: int) -> dict[str, str]:
    return {t.name: t.digest for t in store.manifest(version).tensors}


def publish(pub: Publisher, version: int) -> tuple[int, int]:
    """Publish the probe's ``version`` content; (version committed, attempts it took).

    A publish that meets the failover still in progress fails with
    ``StoreUnavailable`` and is tried again, as an operator would.
    """
    for attempt in range(1, 6):
        try:
            return pub.publish(state(version), message=f"v{version}"), attempt
        except StoreUnavailable:
            if attempt == 5:
                raise
    raise AssertionError("unreachable")


def assert_runs_exactly_one(store: Store, digests: dict[str, str], version: int) -> None:
    """docs/reliability.md's check: bit-equal to ``version``, and every version it
    equals has that very content (never a mix of two)."""
    matching = [v for v in store.versions() if content_of(store, v) == digests]
    assert version in matching, f"live model matches {matching}, expected v{version}"
