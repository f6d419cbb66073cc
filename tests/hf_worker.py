"""A serving process for test_agent_hf_process.py (run as its own Python process).

Serves a small ``transformers`` ``BertModel`` built from a config (seed 0: its
biases are zeros, as the Hub's MiniLM pooler bias is) with an agent, prints
``READY`` once the agent looked at head, waits until ``--last`` is applied or
refused, and prints one JSON line: what it applied and refused, and the digest
of every parameter and buffer (non-persistent ones included).

    python tests/hf_worker.py REDIS_URL MODEL --last 3
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from agent_support import until

from hotswap import codec
from hotswap.agent import Agent, ApplyReport
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings


def bert(seed: int) -> torch.nn.Module:
    """The served model (and the test's checkpoints): nothing is downloaded."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return transformers.BertModel(config).eval()  # type: ignore[no-any-return]


def digests(model: torch.nn.Module) -> dict[str, str]:
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: codec.digest(codec.as_bytes(t.detach())) for k, t in named.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--last", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = bert(0)
    applied: list[dict[str, int]] = []
    settings = HotswapSettings(
        redis_url=args.redis_url,
        poll_interval=0.5,
        _env_file=None,  # type: ignore[call-arg]
    )

    def on_applied(version: int, r: ApplyReport) -> None:
        applied.append({"version": version, "changed": r.tensors_changed})

    agent = Agent(model, args.model, settings=settings, on_applied=on_applied)
    agent.start()
    until(agent, lambda: agent.head_seen)
    print("READY", agent.agent_id, flush=True)
    refused = None
    try:
        reached = agent.wait_for(args.last, 60)
    except ValidationError as e:
        reached, refused = False, str(e)
    agent.stop()
    result = {"reached": reached, "refused": refused, "applied": applied}
    print(json.dumps({**result, "digests": digests(model)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
