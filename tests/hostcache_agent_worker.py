"""A serving process for test_hostcache_agents.py (run as its own Python process).

Holds a model of ``SHAPES`` (random bytes each version: nothing deduplicates),
with an agent configured from the environment as a user's would be
(``HOTSWAP_HOST_CACHE_DIR`` included). Prints ``READY AGENT_ID`` once the
agent runs, then, once ``--last`` is applied, one JSON line: the digest of
every tensor it holds.

    python tests/hostcache_agent_worker.py REDIS_URL MODEL --last 2
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from hotswap import codec
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings

SHAPES = {"w0": (256, 256), "w1": (256, 256), "w2": (256, 256), "w3": (256, 256), "b": (256,)}


def zeros() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape) for name, shape in SHAPES.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--last", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = zeros()
    settings = HotswapSettings(redis_url=args.redis_url, poll_interval=0.5, _env_file=None)  # type: ignore[call-arg]
    agent = Agent(state, args.model, settings=settings).start()
    print("READY", agent.agent_id, flush=True)
    ok = agent.wait_for(args.last, 60)
    agent.stop()
    digests = {k: codec.digest(codec.as_bytes(t)) for k, t in state.items()}
    print(json.dumps({"reached_last": ok, "digests": digests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
