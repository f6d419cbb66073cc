"""A serving process for the canary-rollout process tests (issue 17): one agent with a
fixed name and track, a probe, a health callback, and a record of every version it ran.

The model's ``mark`` tensor says what a version is: ``mark[1] >= 9`` fails the
probe (``bounded``, installed with ``probe``), ``mark[2] >= 9`` makes the
health callback report an ``error_rate`` of 0.5 while that version runs (a
"sick" version that passes validation and probes). A watcher thread notes each change of
``agent.applied_version`` with ``time.time()`` (one clock for every process
of the host, and the clock Redis's ``TIME`` reads): an apply, a revert when a
rollout takes its pin back, a probe's revert.

The process starts idle (torch imported: the slow part of a start, so the
tests keep idle processes to hand) and serves one agent at a time. Commands
from stdin, one JSON line each; one JSON reply line each::

    python tests/rollout_worker.py                    prints {"idle": true}
    {"cmd": "serve", "url": URL, "model": "m", "name": "c1", "track": "canary",
     "probe": true, "heartbeat_ttl": 2}   a new agent: {"ready": AGENT_ID, "at": T}
    {"cmd": "state"}                      what runs, pins, the history, digests
    {"cmd": "health", "values": {"error_rate": 0.5}}   numbers the callback adds
    {"cmd": "until", "version": 1, "timeout": 20}      wait until it runs version 1
    {"cmd": "stop"}                       stop the agent (the process idles again)
    {"cmd": "quit"}
"""

from __future__ import annotations

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


class Serving:
    """The agent this process runs now (one at a time), with its history."""

    def __init__(self, request: dict[str, Any]) -> None:
        settings = HotswapSettings(
            redis_url=request["url"],
            poll_interval=float(request.get("poll", 0.3)),
            heartbeat_ttl=float(request.get("heartbeat_ttl", 10.0)),
            health_interval=0.1,
            agent_name=request["name"],
            track=request.get("track", "stable"),
            retry_attempts=4,
            retry_max_wait=0.5,
            socket_timeout=2.0,
            connect_timeout=1.0,
            _env_file=None,  # type: ignore[call-arg]
        )
        self.model = Net()
        self.history = History()
        self.base: dict[str, float] = {}
        self.agent = Agent(
            self.model,
            request["model"],
            settings=settings,
            probes=[bounded] if request.get("probe") else [],
            health=self.health,
            on_applied=lambda v, _r: self.history.add("applied", v),
            on_rejected=lambda v, reasons: self.history.add("rejected", v, reasons=reasons),
        )
        self.stop = threading.Event()
        self.watcher = threading.Thread(
            target=watch, args=(self.agent, self.history, self.stop), daemon=True
        )
        self.watcher.start()
        self.agent.start()

    def health(self) -> dict[str, float]:
        numbers = dict(self.base)
        if float(self.model.mark.detach()[2]) >= 9:
            numbers["error_rate"] = 0.5
        return numbers

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {}
        agent = self.agent
        if request["cmd"] == "health":
            self.base.update({k: float(v) for k, v in request["values"].items()})
        elif request["cmd"] == "until":
            deadline = time.monotonic() + float(request.get("timeout", 20))
            want = int(request["version"])
            while agent.applied_version != want and time.monotonic() < deadline:
                time.sleep(0.01)
            reply["ok"] = agent.applied_version == want
        with agent.reading():
            reply["digests"] = digests(self.model)
        reply.update(
            applied=agent.applied_version,
            pinned=agent.pinned_version,
            head=agent.head_version,
            state=agent.state,
            history=self.history.copy(),
        )
        return reply

    def close(self) -> None:
        self.stop.set()
        self.agent.stop()
        self.watcher.join(5)


def main() -> int:
    torch.set_num_threads(1)
    print(json.dumps({"idle": True}), flush=True)
    serving: Serving | None = None
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        cmd = request["cmd"]
        if cmd == "quit":
            break
        if cmd == "serve":
            assert serving is None, "serving already: stop first"
            serving = Serving(request)
            reply: dict[str, Any] = {"ready": serving.agent.agent_id, "at": time.time()}
        elif cmd == "stop":
            if serving is not None:
                serving.close()
            serving, reply = None, {"stopped": True}
        else:
            assert serving is not None, f"{cmd}: serve first"
            reply = serving.answer(request)
        print(json.dumps(reply), flush=True)
    if serving is not None:
        serving.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
