"""Revert and probes in a serving process of its own, as in production (issue 17):
the revert works while Redis is down, the reverted version is not applied again
once Redis is back, and a probe failure leaves the process on what it ran."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from hotswap import codec
from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.status import decode
from hotswap.store import Store
from publisher.publisher import Publisher

WORKER = Path(__file__).parent / "revert_worker.py"


class Serving:
    """The worker process: send a command, read its one-line JSON reply."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.agent_id = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.wait(10)}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(64, 64, generator=g)
    return {"w": w, "b": torch.rand(64, generator=g)}


def digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(t)) for k, t in sd.items()}


@pytest.fixture
def durable() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persist=True) as server:
        yield server


def test_revert_while_redis_is_down_then_probes_refuse_a_bad_version(
    durable: EmbeddedRedis,
) -> None:
    settings = HotswapSettings(redis_url=durable.url, _env_file=None)  # type: ignore[call-arg]
    s1, s2, s3 = state(1), state(2), state(3)
    serving = Serving(durable.url)
    try:
        with Publisher("m", settings=settings) as pub:
            v1 = pub.publish(s1)
            assert serving("wait", version=v1)["ok"]
            v2 = pub.publish(s2)
            assert serving("wait", version=v2)["digests"] == digests(s2)
        durable.kill()
        back = serving("revert")
        assert back["back"] == v1 and back["applied"] == v1
        assert back["digests"] == digests(s1)
        durable.start()  # persisted: head is v2 again
        # The agent reconnects and polls; v2 stays refused, v1 keeps running.
        waited = serving("wait", version=v2)
        assert "reverted: by Agent.revert()" in waited["error"]
        assert waited["applied"] == v1 and waited["digests"] == digests(s1)
        with Publisher("m", settings=settings) as pub:
            assert pub.store.head() == v2
            v3 = pub.publish(s3)
            assert serving("wait", version=v3)["digests"] == digests(s3)
            bad = state(4)
            bad["w"][0, 0] = 9.5  # finite, a plausible norm: only the probe sees it
            v4 = pub.publish(bad)
            refused = serving("wait", version=v4)
        assert "a post-apply probe: probe bounded: a weight reached" in refused["error"]
        assert refused["applied"] == v3 and refused["digests"] == digests(s3)
        client = redis.Redis.from_url(durable.url)
        records = Store.from_settings(client, "m", settings).agent_records()
        (raw,) = [raw for found, raw, _ in records if found == serving.agent_id]
        assert decode(raw).version == v3 and decode(raw).rejected_version == v4
        client.close()
    finally:
        serving.close()
