"""A serving process for the canary-rollout process tests (issue 17): one agent with a
fixed name and track, a probe, a health callback, and a record of every version it ran.

The model's ``mark`` tensor says what a version is: ``mark[1] >= 9`` fails the
probe (``bounded``, installed with ``--probe``), ``mark[2] >= 9`` makes the
health callback report an ``error_rate`` of 0.5 while that version runs (a
"sick" version that passes validation and probes). A watcher thread notes each change of
``agent.applied_version`` with ``time.time()`` (one clock for every process
of the host, and the clock Redis's ``TIME`` reads): an apply, a revert when a
rollout takes its pin back, a probe's revert.

Commands from stdin, one JSON line each; one JSON reply line each::

    python tests/rollout_worker.py REDIS_URL MODEL --name c1 --track canary --probe
    {"cmd": "state"}                      what runs, pins, the history, digests
    {"cmd": "health", "values": {"error_rate": 0.5}}   numbers the callback adds
    {"cmd": "until", "version": 1, "timeout": 20}      wait until it runs version 1
    {"cmd": "quit"}

The first line out is ``{"ready": AGENT_ID, "at": WALL_CLOCK}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import torch

from hotswap import codec
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings

# Seconds between two looks of the watcher at the applied version: the
# resolution of the revert times the tests print.
WATCH_EVERY = 0.001


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, 64))
        self.mark = torch.nn.Parameter(torch.zeros(4))


def bounded(model: Net) -> str | None:
    """The probe: a version whose ``mark[1]`` is 9 or more answers badly."""
    top = float(model.mark.detach()[1])
    return None if top < 9 else f"mark[1] reached {top:g}"


def digests(model: Net) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(t)) for k, t in model.state_dict().items()}


class History:
    """Every version the agent ran, applied or was refused, with wall-clock times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def add(self, event: str, version: int | None, **more: Any) -> None:
        with self.lock:
            self.events.append({"event": event, "version": version, "at": time.time(), **more})

    def copy(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)


def watch(agent: Agent, history: History, stop: threading.Event) -> None:
    """Note each change of the version the model runs ("running" events)."""
    seen: int | None = None
    while not stop.wait(WATCH_EVERY):
        now = agent.applied_version
        if now != seen:
            history.add("running", now)
            seen = now


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--track", default="stable")
    parser.add_argument("--heartbeat-ttl", type=float, default=10.0)
    parser.add_argument("--poll", type=float, default=0.3)
    parser.add_argument("--probe", action="store_true", help="install the probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = HotswapSettings(
        redis_url=args.redis_url,
        poll_interval=args.poll,
        heartbeat_ttl=args.heartbeat_ttl,
        health_interval=0.1,
        agent_name=args.name,
        track=args.track,
        retry_attempts=4,
        retry_max_wait=0.5,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
    )
    model = Net()
    history = History()
    base: dict[str, float] = {}

    def health() -> dict[str, float]:
        numbers = dict(base)
        if float(model.mark.detach()[2]) >= 9:
            numbers["error_rate"] = 0.5
        return numbers

    agent = Agent(
        model,
        args.model,
        settings=settings,
        probes=[bounded] if args.probe else [],
        health=health,
        on_applied=lambda v, _r: history.add("applied", v),
        on_rejected=lambda v, reasons: history.add("rejected", v, reasons=reasons),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(agent, history, stop), daemon=True)
    watcher.start()
    agent.start()
    print(json.dumps({"ready": agent.agent_id, "at": time.time()}), flush=True)
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        reply: dict[str, Any] = {}
        if request["cmd"] == "health":
            base.update({k: float(v) for k, v in request["values"].items()})
        elif request["cmd"] == "until":
            deadline = time.monotonic() + float(request.get("timeout", 20))
            want = int(request["version"])
            while agent.applied_version != want and time.monotonic() < deadline:
                time.sleep(0.01)
            reply["ok"] = agent.applied_version == want
        elif request["cmd"] == "quit":
            break
        with agent.reading():
            reply["digests"] = digests(model)
        reply.update(
            applied=agent.applied_version,
            pinned=agent.pinned_version,
            head=agent.head_version,
            state=agent.state,
            history=history.copy(),
        )
        print(json.dumps(reply), flush=True)
    stop.set()
    agent.stop()
    watcher.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
