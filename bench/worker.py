"""The serving side of the benchmark, in its own process (own GIL, own RSS).

Speaks JSON lines: one command per stdin line, one reply per command, and
asynchronous events (something was applied) on stdout. Times are
``time.monotonic()``, which is CLOCK_MONOTONIC and so comparable across
processes on one machine.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis
import torch

from bench import baselines, model
from bench.memory import PeakRss
from bench.procs import serve
from hotswap import HotswapSettings

EVICT_BYTES = 128 * 1024 * 1024


class Worker:
    def __init__(self) -> None:
        self._out = threading.Lock()
        self.live: dict[str, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self.client: redis.Redis | None = None
        self.transport: baselines.BlobTransport | None = None
        self.agent: Any = None
        self.mem = PeakRss()
        self.cpu_armed = time.process_time()

    def emit(self, message: dict[str, Any]) -> None:
        with self._out:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    # -- commands -----------------------------------------------------------------

    def init(self, url: str, size: int, dtype: str, seed: int, window: int) -> dict[str, Any]:
        torch_dtype = getattr(torch, dtype)
        self.live = model.build(size, torch_dtype, seed)
        # Where the ceiling and naive runs land: never the agent's live tensors.
        self.shadow = {k: v.clone() for k, v in self.live.items()}
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.transport = baselines.raw_transport(self.client, window)
        return {"tensors": len(self.live)}

    def arm(self, mode: str, names: list[str], prefix: str, channel: str, chunk: int) -> None:
        """Wait (in a thread) for one notice on ``channel``, then apply like ``mode``."""
        assert self.client is not None and self.transport is not None
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        transport, client = self.transport, self.client
        self.mem_arm()

        def run() -> None:
            try:
                while True:
                    msg = pubsub.get_message(timeout=60)
                    if msg is not None:
                        break
                t_notice = time.monotonic()
                if mode == "ceiling":
                    got = baselines.ceiling_apply(transport, self.shadow, names, chunk, prefix)
                else:
                    got = baselines.naive_apply(client, self.shadow, names, prefix)
                t_done = time.monotonic()
                peak = self.mem.stop()
                self.emit(
                    {
                        "event": "applied",
                        "mode": mode,
                        "t_notice": t_notice,
                        "t_done": t_done,
                        "bytes": got,
                        "peak_extra": peak,
                        "cpu": time.process_time() - self.cpu_armed,
                    }
                )
            except Exception as e:
                self.emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
            finally:
                pubsub.close()

        threading.Thread(target=run, daemon=True).start()

    def agent_start(self, model_name: str, settings: dict[str, Any]) -> None:
        from hotswap import Agent

        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]

        def applied(version: int, report: Any) -> None:
            t_done = time.monotonic()
            peak = self.mem.stop()
            self.emit(
                {
                    "event": "agent_applied",
                    "version": version,
                    "t_done": t_done,
                    "report": asdict(report),
                    "peak_extra": peak,
                    "cpu": time.process_time() - self.cpu_armed,
                }
            )

        def rejected(version: int, reasons: dict[str, list[str]]) -> None:
            self.emit({"event": "error", "error": f"v{version} rejected: {reasons}"})

        self.agent = Agent(
            self.live, model_name, settings=config, on_applied=applied, on_rejected=rejected
        )
        self.agent.start()

    def agent_stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def mem_arm(self) -> None:
        """Start counting this process's peak memory and CPU time (every thread) for one apply."""
        self.mem.start()
        self.cpu_armed = time.process_time()

    def bare_copy(self, names: list[str], reps: int) -> list[float]:
        """Seconds of a plain ``copy_`` of these tensors from fresh memory, per rep."""
        src = {n: self.live[n].clone() for n in names}
        # Larger than any last-level cache: a small tensor copied over and over
        # would otherwise be timed from cache, which an update never enjoys.
        evict = torch.zeros(EVICT_BYTES, dtype=torch.uint8)
        times = []
        with torch.no_grad():
            for n in names:  # warm-up: thread pool up, pages touched
                self.shadow[n].copy_(src[n])
            for _ in range(reps):
                evict.add_(1)
                start = time.perf_counter()
                for n in names:
                    self.shadow[n].copy_(src[n])
                times.append(time.perf_counter() - start)
        return times


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    worker = Worker()
    commands: dict[str, Callable[..., Any]] = {
        "init": worker.init,
        "arm": worker.arm,
        "agent_start": worker.agent_start,
        "agent_stop": worker.agent_stop,
        "mem_arm": worker.mem_arm,
        "bare_copy": worker.bare_copy,
    }
    serve(commands, worker.emit, worker.agent_stop)


if __name__ == "__main__":
    main()
