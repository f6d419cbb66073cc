"""The serving process of ``bench.serving``: forward passes next to an embedded agent.

One process, as a user runs it: a serving thread runs forward passes of a
stack of ``Linear`` layers (one torch thread, each pass inside
``agent.reading()``) and records when each began and ended; the agent in the
same process applies what the main process publishes. Speaks JSON lines
(``bench.procs.serve``): commands on stdin, replies and ``agent_applied``
events on stdout. Times are ``time.monotonic()``, comparable across the
processes of one host, so the main process's "publish returned" markers and
the agent's apply times bound the windows the passes are sorted into.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

import torch

from bench.procs import serve
from hotswap import Agent, ApplyReport, HotswapSettings

MiB = 1024 * 1024
LAYERS = 8
WARMUP_PASSES = 20


def build(size: int, seed: int = 0) -> torch.nn.Sequential:
    """``LAYERS`` square float32 ``Linear`` layers (ReLU between) of about ``size`` bytes."""
    width = max(64, round(math.sqrt(size / 4 / LAYERS) / 64) * 64)
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def width_of(net: torch.nn.Sequential) -> int:
    first = net[0]
    assert isinstance(first, torch.nn.Linear)
    return int(first.in_features)


class Serving:
    """The serving loop and its agent; ``stop`` hands back every pass's start and end."""

    def __init__(self) -> None:
        self._out = threading.Lock()
        self.net: torch.nn.Sequential | None = None
        self.agent: Agent | None = None
        self.batch = 8
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.markers: dict[int, float] = {}
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._error: str | None = None

    def emit(self, message: dict[str, Any]) -> None:
        with self._out:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    # -- commands -----------------------------------------------------------------

    def init(
        self, size: int, batch: int, model_name: str, settings: dict[str, Any], head: int
    ) -> dict[str, Any]:
        """Build the model, start its agent and wait until it runs ``head``."""
        self.net, self.batch = build(size, seed=1), batch
        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]

        def applied(version: int, report: ApplyReport) -> None:
            t_done = time.monotonic()
            self.emit(
                {
                    "event": "agent_applied",
                    "version": version,
                    "t_done": t_done,
                    "report": asdict(report),
                }
            )

        def rejected(version: int, reasons: dict[str, list[str]]) -> None:
            self.emit({"event": "error", "error": f"v{version} rejected: {reasons}"})

        self.agent = Agent(
            self.net, model_name, settings=config, on_applied=applied, on_rejected=rejected
        )
        self.agent.start()
        if not self.agent.wait_for(head, 120):
            raise RuntimeError(f"the agent did not apply v{head} within 120 s")
        nbytes = sum(p.numel() * p.element_size() for p in self.net.state_dict().values())
        return {"width": width_of(self.net), "bytes": nbytes}

    def start(self) -> None:
        """Start the serving thread (warm-up passes first, not recorded)."""
        self._stop.clear()
        self._loop = threading.Thread(target=self._serve, name="serving", daemon=True)
        self._loop.start()

    def _serve(self) -> None:
        # The brief's one torch thread: the agent's threads keep torch's defaults.
        torch.set_num_threads(1)
        net, agent = self.net, self.agent
        assert net is not None and agent is not None
        x = torch.randn(self.batch, width_of(net))
        try:
            with torch.no_grad():
                for _ in range(WARMUP_PASSES):
                    with agent.reading():
                        net(x)
                while not self._stop.is_set():
                    began = time.monotonic()
                    with agent.reading():
                        net(x)
                    self.starts.append(began)
                    self.ends.append(time.monotonic())
        except Exception as e:  # reported by ``stop``, which the main process waits on
            self._error = f"{type(e).__name__}: {e}"

    def marker(self, version: int, t: float) -> None:
        """The main process's publish of ``version`` returned at ``t``."""
        self.markers[version] = t

    def stop(self) -> dict[str, Any]:
        """Stop serving; every pass's (start, end) and the markers, then forget them."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join()
        if self._error is not None:
            raise RuntimeError(f"the serving loop failed: {self._error}")
        out = {"starts": self.starts, "ends": self.ends, "markers": self.markers}
        self.starts, self.ends, self.markers = [], [], {}
        return out

    def finish(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join()
        if self.agent is not None:
            self.agent.stop()
            self.agent = None


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    s = Serving()
    serve({"init": s.init, "start": s.start, "marker": s.marker, "stop": s.stop}, s.emit, s.finish)


if __name__ == "__main__":
    main()
