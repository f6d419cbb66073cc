"""A serving process for test_agent_names_process.py (run as its own Python process).

Serves ``agent_support.Ten()`` with an agent (the issue's lenient policy:
unknown tensors ignored, missing ones kept; ``--strip PREFIX`` adds a name
map), prints ``READY <agent id>``, then answers one JSON line per
``wait VERSION`` read from stdin: whether it was applied, the refusal, the
version the model runs, and the digest of every live tensor. ``quit`` stops.

    python tests/names_worker.py REDIS_URL MODEL [--strip bert.]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from agent_support import Ten, until

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.names import NameMap
from hotswap.settings import HotswapSettings
from hotswap.validate import Policy


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--strip", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Ten()
    settings = HotswapSettings(
        redis_url=args.redis_url,
        poll_interval=0.5,
        _env_file=None,
    )
    names = NameMap(strip_prefix=args.strip) if args.strip else None
    policy = Policy(unknown_tensors="ignore", missing_tensors="keep")
    with Agent(model, args.model, settings=settings, policy=policy, names=names) as agent:
        until(agent, lambda: agent.state != "starting")
        print("READY", agent.agent_id, flush=True)
        for line in sys.stdin:
            command = line.split()
            if command == ["quit"]:
                break
            version = int(command[1])
            out: dict[str, object] = {"version": version, "applied": False, "error": None}
            try:
                out["applied"] = agent.wait_for(version, 30)
            except ValidationError as e:
                out["error"], out["reasons"] = str(e), e.reasons
            with agent.reading():
                out["applied_version"] = agent.applied_version
                out["digests"] = {
                    k: codec.digest(codec.as_bytes(t)) for k, t in model.state_dict().items()
                }
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
