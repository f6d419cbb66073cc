"""A serving process for the revert and probe tests (issue 17): an agent whose probe
refuses a model with a weight of 9 or more; commands from stdin, one JSON line each.

    python tests/revert_worker.py REDIS_URL   then lines: {"cmd": "wait", "version": 2},
    {"cmd": "revert"}, {"cmd": "state"}, {"cmd": "quit"}
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import HotswapError, ValidationError
from hotswap.settings import HotswapSettings


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, 64))
        self.b = torch.nn.Parameter(torch.zeros(64))


def bounded(model: Net) -> str | None:
    top = float(model.w.abs().max())
    return None if top < 9 else f"a weight reached {top:g}"


def digests(model: Net) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(t)) for k, t in model.state_dict().items()}


def main() -> int:
    settings = HotswapSettings(
        redis_url=sys.argv[1],
        poll_interval=0.3,
        retry_attempts=2,
        retry_max_wait=0.2,
        socket_timeout=2.0,
        connect_timeout=0.5,
        heartbeat_ttl=30,
        _env_file=None,  # type: ignore[call-arg]
    )
    model = Net()
    agent = Agent(model, "m", settings=settings, probes=[bounded]).start()
    print(json.dumps({"ready": agent.agent_id}), flush=True)
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        reply: dict[str, Any] = {}
        try:
            if request["cmd"] == "wait":
                reply["ok"] = agent.wait_for(int(request["version"]), 30)
            elif request["cmd"] == "revert":
                reply["back"] = agent.revert()
            elif request["cmd"] == "quit":
                break
        except (HotswapError, ValidationError) as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        reply.update(applied=agent.applied_version, state=agent.state, digests=digests(model))
        print(json.dumps(reply), flush=True)
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
