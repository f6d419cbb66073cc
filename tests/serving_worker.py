"""A serving process for test_serving_process.py (run as its own Python process).

Builds a probe model whose every tensor of version ``k`` holds the value
``BASE + k``, starts an agent, and serves forward passes in 4 threads inside
``agent.reading()``. Each output names the version of every tensor exactly,
so a pass that saw two versions (or a half-copied tensor) is caught. Prints
``READY`` once the agent is connected, then waits until ``--last`` is
applied and prints one JSON line with what it saw.

    python tests/serving_worker.py REDIS_URL MODEL --last 50
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import torch
from agent_support import until

from hotswap import codec
from hotswap.agent import Agent, ApplyReport
from hotswap.settings import HotswapSettings

BASE = 100.0  # keeps every new/old norm ratio near 1 even when versions are skipped
WIDTH = 128
LAYERS = 6
READERS = 4


class Probe(torch.nn.Module):
    """Each tensor feeds its own output: all outputs agree only if all tensors do."""

    offset: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
        self.register_buffer("offset", torch.zeros(WIDTH))
        fill(self.state_dict(), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [layer(x).sum(dim=-1) for layer in self.layers]
        outs.append((x * self.offset).sum(dim=-1))
        return torch.stack(outs, dim=-1)


def fill(state: dict[str, torch.Tensor], version: int) -> None:
    with torch.no_grad():
        for t in state.values():
            t.fill_(BASE + version)


def fill_sparse(state: dict[str, torch.Tensor], version: int) -> None:
    """Like ``fill`` for the sums ``decode`` reads, changing one element in WIDTH:
    ``BASE`` everywhere, every WIDTH-th element ``BASE + WIDTH * version``."""
    with torch.no_grad():
        for t in state.values():
            t.fill_(BASE)
            t.view(-1)[::WIDTH] += WIDTH * version


def decode(out: torch.Tensor) -> list[float]:
    """The version each tensor group was at: (weight, bias) per layer, then the buffer."""
    # With x = ones: a layer gives WIDTH * (WIDTH * v + v), the buffer WIDTH * v.
    factors = [WIDTH * (WIDTH + 1)] * LAYERS + [WIDTH]
    return [float(o) / f - BASE for o, f in zip(out.tolist(), factors, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--last", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Probe()
    before = {k: (t.data_ptr(), id(t)) for k, t in model.state_dict(keep_vars=True).items()}
    applied: list[int] = []
    # (tensors patched, tensors validated by patch) per applied version.
    patched: list[tuple[int, int]] = []

    def on_applied(version: int, report: ApplyReport) -> None:
        applied.append(version)
        patched.append((report.tensors_patched, report.tensors_validated_by_patch))
    settings = HotswapSettings(
        redis_url=args.redis_url,
        poll_interval=0.5,
        _env_file=None,  # type: ignore[call-arg]
    )
    agent = Agent(model, args.model, settings=settings, on_applied=on_applied)
    stop = threading.Event()
    lock = threading.Condition()
    seen: dict[str, int] = {}
    mixed: list[object] = []
    passes = [0]
    x = torch.ones(1, WIDTH)

    def serve() -> None:
        while not stop.is_set():
            with agent.reading(), torch.no_grad():
                number = agent.applied_version
                out = model(x)[0]
            versions = decode(out)
            expected = 0 if number is None else number
            with lock:
                passes[0] += 1
                if any(v != expected for v in versions):
                    mixed.append({"applied_version": number, "versions": versions})
                else:
                    seen[str(expected)] = seen.get(str(expected), 0) + 1
                lock.notify_all()

    agent.start()
    until(agent, lambda: agent.state == "idle")
    threads = [threading.Thread(target=serve) for _ in range(READERS)]
    for t in threads:
        t.start()
    print("READY", agent.agent_id, flush=True)
    ok = agent.wait_for(args.last, args.timeout)
    with lock:  # the readers serve the last version a few dozen times before the end
        lock.wait_for(lambda: seen.get(str(args.last), 0) >= 10 * READERS, 10)
    stop.set()
    for t in threads:
        t.join()
    agent.stop()
    after = {k: (t.data_ptr(), id(t)) for k, t in model.state_dict(keep_vars=True).items()}
    result = {
        "reached_last": ok,
        "applied": applied,
        "patched": patched,
        "passes": passes[0],
        "seen": seen,
        "mixed": mixed[:20],
        "mixed_count": len(mixed),
        "pointers_unchanged": before == after,
        "digests": {k: codec.digest(codec.as_bytes(t)) for k, t in model.state_dict().items()},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
