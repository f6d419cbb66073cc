"""Soak (``make soak``): 500 consecutive updates into a serving process.

The serving process (soak_worker.py) runs one Agent and 8 reader threads that
read every tensor under ``agent.reading()``; its agent is replaced by a new
one every 100 updates. Proven: every version applied in turn, zero mixed
reads, and resident memory after the run within 10% of after 50 updates.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rel_support import settings_for

from hotswap.embedded import EmbeddedRedis
from publisher.publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.soak]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
UPDATES, READERS, RESTART_EVERY, TENSORS, WIDTH = 500, 8, 100, 8, 256


class Child:
    """The serving process, driven over stdin/stdout one line at a time."""

    def __init__(self, url: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        args = [str(a) for a in (url, "soak", TENSORS, WIDTH, READERS)]
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "soak_worker.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<exit>")

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line
            assert line != "<exit>", f"serving process exited waiting for {prefix!r}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def version_state(k: int) -> dict[str, torch.Tensor]:
    return {f"t{j}": torch.full((WIDTH, WIDTH), float(k * (j + 1))) for j in range(TENSORS)}


@pytest.mark.timeout(1200)
def test_soak_500_updates_8_readers_agent_restarts() -> None:
    with EmbeddedRedis() as server:
        child = Child(server.url)
        try:
            child.expect("ready", 120)
            latencies: list[float] = []
            started = time.monotonic()
            with Publisher("soak", settings=settings_for(server)) as pub:
                for k in range(1, UPDATES + 1):
                    sent = time.monotonic()
                    assert pub.publish(version_state(k)) == k
                    child.expect(f"applied {k}")
                    latencies.append(time.monotonic() - sent)
                    if k == 50:
                        child.send("rss 50")
                        child.expect("rss 50")
                    if k % RESTART_EVERY == 0 and k < UPDATES:
                        child.send(f"restart {k}")
                        child.expect(f"restarted {k}")
            took = time.monotonic() - started
            child.send(f"rss {UPDATES}")
            child.expect(f"rss {UPDATES}")
            child.send("stop")
            summary = json.loads(child.expect("{", 60))
        finally:
            child.close()
    rss50, rss_end = summary["rss"]["50"], summary["rss"][str(UPDATES)]
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[int(len(ms) * 0.99)]
    print(
        f"\nsoak: {UPDATES} updates of {TENSORS} x {WIDTH}x{WIDTH} float32 "
        f"({TENSORS * WIDTH * WIDTH * 4 / 2**20:.0f} MiB each) in {took:.0f} s; "
        f"publish-to-applied median {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms; "
        f"{READERS} readers did {summary['reads']} reads, {summary['mixed']} mixed, "
        f"saw {summary['distinct_versions_read']} distinct versions; "
        f"{summary['restarts']} agent restarts; "
        f"RSS after 50 updates {rss50 / 2**20:.1f} MiB, after {UPDATES} {rss_end / 2**20:.1f} MiB "
        f"({(rss_end / rss50 - 1) * 100:+.1f}%)"
    )
    assert summary["mixed"] == 0
    assert summary["reads"] > UPDATES
    assert summary["restarts"] == UPDATES // RESTART_EVERY - 1
    assert summary["final"] == [float(UPDATES)]
    assert rss_end <= rss50 * 1.10
