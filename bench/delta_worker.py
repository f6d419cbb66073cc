"""The delta benchmark's serving process: ``bench.worker`` with several agents by tag.

Each tag is one set of live tensors (zeros until an agent fills them) and
at most one ``Agent`` following a model into them: the agent of the model
published with deltas, the one published with full blobs, and a late agent
started long after the others. The ceiling and naive baselines run as in
``bench.worker``, into ``shadow`` (a copy of one tag's tensors).
Events of an agent are ``agent_applied:TAG``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis
import torch

from bench import baselines
from bench.procs import WorkerProc, serve
from bench.worker import Worker
from hotswap import HotswapSettings, codec


class DeltaWorker(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.agents: dict[str, Any] = {}

    def connect(self, url: str, window: int) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.transport = baselines.raw_transport(self.client, window)

    def build(self, tag: str, shapes: list[tuple[str, list[int]]], dtype: str) -> int:
        """Zeros of ``shapes``: what an agent that has never applied anything holds."""
        self.tensors[tag] = {n: torch.zeros(s, dtype=getattr(torch, dtype)) for n, s in shapes}
        return sum(t.numel() * t.element_size() for t in self.tensors[tag].values())

    def use_shadow(self, tag: str) -> None:
        """The baselines' destination: a copy of ``tag``'s tensors, never the agent's."""
        self.shadow = {k: v.clone() for k, v in self.tensors[tag].items()}

    def start(self, tag: str, model_name: str, settings: dict[str, Any]) -> None:
        from hotswap import Agent

        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]

        def applied(version: int, report: Any) -> None:
            t_done = time.monotonic()
            peak = self.mem.stop()
            self.emit(
                {
                    "event": f"agent_applied:{tag}",
                    "version": version,
                    "t_done": t_done,
                    "report": asdict(report),
                    "peak_extra": peak,
                    "cpu": time.process_time() - self.cpu_armed,
                }
            )

        def rejected(version: int, reasons: dict[str, list[str]]) -> None:
            self.emit({"event": "error", "error": f"{tag}: v{version} rejected: {reasons}"})

        self.agents[tag] = Agent(
            self.tensors[tag], model_name, settings=config, on_applied=applied, on_rejected=rejected
        )
        self.agents[tag].start()

    def stop(self, tag: str) -> None:
        agent = self.agents.pop(tag, None)
        if agent is not None:
            agent.stop()

    def drop(self, tag: str) -> None:
        self.stop(tag)
        self.tensors.pop(tag, None)

    def digests(self, tag: str) -> dict[str, str]:
        """BLAKE3 of each live tensor of ``tag``, read under the agent's reader lock."""
        agent = self.agents.get(tag)
        tensors = self.tensors[tag]
        if agent is None:
            return {n: codec.digest(codec.as_bytes(t)) for n, t in tensors.items()}
        with agent.reading():
            return {n: codec.digest(codec.as_bytes(t)) for n, t in tensors.items()}

    def stop_all(self) -> None:
        for tag in list(self.agents):
            self.stop(tag)


class DeltaWorkerProc(WorkerProc):
    """``python -m bench.delta_worker`` over JSON lines, as ``WorkerProc`` runs bench.worker."""

    def __init__(self) -> None:
        super().__init__("bench.delta_worker")

    def __enter__(self) -> DeltaWorkerProc:
        return self

    def applied(self, tag: str, version: int, timeout: float = 300.0) -> dict[str, Any]:
        """The event of ``tag``'s agent applying ``version`` or a newer one."""
        while True:
            ev = self.event(f"agent_applied:{tag}", timeout=timeout)
            if ev["version"] >= version:
                return ev


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    worker = DeltaWorker()
    commands: dict[str, Callable[..., Any]] = {
        "connect": worker.connect,
        "build": worker.build,
        "use_shadow": worker.use_shadow,
        "start": worker.start,
        "stop": worker.stop,
        "drop": worker.drop,
        "digests": worker.digests,
        "arm": worker.arm,
        "mem_arm": worker.mem_arm,
    }
    serve(commands, worker.emit, worker.stop_all)


if __name__ == "__main__":
    main()
