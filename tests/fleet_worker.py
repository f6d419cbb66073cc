"""An agent in its own process for test_cli_wait.py: ``Ten`` kept at head until stdin closes.

    python tests/fleet_worker.py REDIS_URL MODEL AGENT_ID

Prints ``READY`` once the agent has started, stops the agent (a clean stop,
``state="stopped"``) when stdin reaches its end, then prints ``STOPPED``.
"""

from __future__ import annotations

import sys

import torch
from agent_support import Ten

from hotswap.agent import Agent
from hotswap.settings import HotswapSettings


def main() -> None:
    url, model_name, agent_id = sys.argv[1:4]
    torch.set_num_threads(1)
    settings = HotswapSettings(
        redis_url=url,
        agent_id=agent_id,
        poll_interval=0.5,
        _env_file=None,  # type: ignore[call-arg]
    )
    agent = Agent(Ten(), model_name, settings=settings).start()
    print("READY", flush=True)
    sys.stdin.read()
    agent.stop()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
