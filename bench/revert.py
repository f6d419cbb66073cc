"""How long ``Agent.revert()`` holds the writer lock, against a bare ``copy_`` of the bytes.

    python -m bench.revert [--changed-mib 16] [--model-mib 64] [--repeats 7]

A float32 model of ``--model-mib`` MiB takes versions that each rewrite
``--changed-mib`` MiB of it (whole tensors: a fine-tuning step), through a
real Publisher, Redis and Agent; after each apply the agent reverts it from
host memory. In the same run, the same live tensors are overwritten by a bare
``copy_`` from tensors of the same sizes. Issue 17's target: the revert's
pause at most 1.5x the copy. A throwaway redis-server is started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from hotswap import Agent, ApplyReport, HotswapSettings
from hotswap.embedded import EmbeddedRedis
from publisher import Publisher

MiB = 1024 * 1024
TARGET = 1.5
BLOCK_MIB = 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.revert", description=__doc__)
    p.add_argument("--changed-mib", type=int, default=16)
    p.add_argument("--model-mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    blocks = max(1, args.model_mib // BLOCK_MIB)
    changed = max(1, min(blocks, args.changed_mib // BLOCK_MIB))
    rows = BLOCK_MIB * MiB // 4096
    model = {f"b{i}": torch.zeros(rows, 1024) for i in range(blocks)}
    state = {k: v.clone() for k, v in model.items()}
    sources = [torch.full((rows, 1024), 7.0) for _ in range(changed)]
    pauses: list[float] = []
    copies: list[float] = []
    with EmbeddedRedis() as srv:
        settings = HotswapSettings(redis_url=srv.url, _env_file=None)  # type: ignore[call-arg]
        with (
            Agent(model, "revert", settings=settings) as agent,
            Publisher("revert", settings=settings) as pub,
        ):
            version = pub.publish(state)
            agent.wait_for(version, 60)
            for step in range(args.repeats):
                for i in range(changed):
                    state[f"b{i}"].fill_(float(step + 1))
                version = pub.publish(state)
                agent.wait_for(version, 60)
                agent.revert()
                pauses.append(agent._pipeline.writer.last_revert_seconds)
                # The same bytes by a bare copy_, then what the agent runs put back:
                # anything else would leave it bytes other than it knows.
                runs = [model[f"b{i}"].clone() for i in range(changed)]
                started = time.perf_counter()
                with torch.no_grad():
                    for i in range(changed):
                        model[f"b{i}"].copy_(sources[i])
                copies.append(time.perf_counter() - started)
                with torch.no_grad():
                    for i in range(changed):
                        model[f"b{i}"].copy_(runs[i])
        probed = _probe_overhead(settings, blocks, changed, rows, args.repeats)
    pause, copy = statistics.median(pauses), statistics.median(copies)
    size = f"{changed * BLOCK_MIB} MiB in a {blocks * BLOCK_MIB} MiB model"
    print(f"revert of {size}, {args.repeats} runs")
    print(f"  revert pause  median {pause * 1e3:.2f} ms (min {min(pauses) * 1e3:.2f})")
    print(f"  bare copy_    median {copy * 1e3:.2f} ms (min {min(copies) * 1e3:.2f})")
    ratio = pause / copy
    print(f"  ratio {ratio:.2f} (target <= {TARGET}): {'met' if ratio <= TARGET else 'not met'}")
    bare, with_probe, own = probed
    print("apply of the same change, writer-lock pause (medians):")
    print(f"  no probe                      {bare * 1e3:.2f} ms")
    less = (with_probe - own) * 1e3
    print(f"  one probe, less its own time  {less:.2f} ms (the probe: {own * 1e3:.2f} ms)")
    print(f"  probe overhead beyond its own time {(with_probe - own - bare) * 1e3:+.2f} ms")
    return 0


def _recorder(into: list[float]) -> Callable[[int, ApplyReport], None]:
    return lambda _v, report: into.append(report.apply_seconds)


def _probe_overhead(
    settings: HotswapSettings, blocks: int, changed: int, rows: int, repeats: int
) -> tuple[float, float, float]:
    """Medians of the writer-lock pause applying the same change without a probe and with
    one (a forward pass of a probe-sized matmul), and of the probe's own time."""
    own: list[float] = []
    probe_input = torch.randn(64, 1024)

    def probe(model: dict[str, torch.Tensor]) -> str | None:
        started = time.perf_counter()
        out = probe_input @ model["b0"][:1024].T
        own.append(time.perf_counter() - started)
        return None if torch.isfinite(out).all() else "not finite"

    medians = []
    for probes in ([], [probe]):
        model = {f"b{i}": torch.zeros(rows, 1024) for i in range(blocks)}
        state = {k: v.clone() for k, v in model.items()}
        paused: list[float] = []
        with (
            Agent(
                model,
                "probed",
                settings=settings,
                probes=probes,
                on_applied=_recorder(paused),
            ) as agent,
            Publisher("probed", settings=settings) as pub,
        ):
            agent.wait_for(pub.publish(state), 60)
            for step in range(repeats):
                for i in range(changed):
                    state[f"b{i}"].fill_(float(step + 1))
                agent.wait_for(pub.publish(state), 60)
            pub.store.delete_all()
        medians.append(statistics.median(paused[1:]))
    return medians[0], medians[1], statistics.median(own)


if __name__ == "__main__":
    sys.exit(main())
