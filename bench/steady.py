"""``python -m bench.steady``: full updates in steady state, against the bare script and naive.

    python -m bench.steady [--size-mb 512] [--rounds 5] [--json PATH]

What users live in: one publisher and one serving process (``bench.worker``,
an ``Agent`` with default settings applying into the live tensors) that have
run for a while, every version kept in Redis. Each round draws every tensor
of a float32 model again (a constant step would go as a small delta) and
sends it three ways, in a rotated order, timed from the first call of the
sender to the serving process's apply:

* **hotswap**: ``Publisher.publish`` (default settings: ``HOTSWAP_KEEP_VERSIONS``
  10, deltas on) to the agent's ``on_applied``;
* **naive**: the ``torch.save`` loop of ``bench.baselines``, fresh keys per
  version (a loop that keeps its versions);
* **bare**: the raw pipelined script of ``bench.baselines`` (1 MiB chunks,
  fresh keys per version, pipelined ``SET``s and ``GET``s, no checks);
* **naive-same**: the naive loop ``SET``ting over the same keys each round (a
  loop that keeps no versions: Redis reuses the values' memory), shown for
  what fresh keys cost; no target compares with it.

Nothing is deleted within the run: no gc (a user's ``gc`` with the default
``HOTSWAP_GC_GRACE_SECONDS`` of an hour would delete nothing this young
anyway), and the naive and bare versions stay too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from bench import baselines, model, results
from bench.procs import WorkerProc
from bench.stats import table
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
MODEL = "bench-steady"
CHANNEL = "bench:steady"
APPROACHES = ("hotswap", "naive", "bare", "naive-same")
# The targets: hotswap within 1.3x the bare script, 1.5x faster than naive.
BARE_RATIO = 1.3
NAIVE_RATIO = 1.5


@dataclass
class Config:
    size_mb: float = 512
    rounds: int = 5
    chunk_mb: float = 1.0
    window: int = baselines.DEFAULT_WINDOW
    seed: int = 0


@dataclass
class Sample:
    """One approach in one round; seconds."""

    round: int
    approach: str
    end_to_end: float
    publish: float
    fetch: float = 0.0
    validate: float = 0.0
    pause: float = 0.0
    # From the publish's return to the agent's first fetch, and from the fetch's
    # end to the apply less validation and pause (the revert copy, the record).
    to_fetch: float = 0.0
    rest: float = 0.0
    bytes_moved: int = 0
    tensors_delta: int = 0
    redis_used: int = 0


def redraw(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Every tensor drawn again, each about its norm (the agent's norm-ratio check passes)."""
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("norm.weight"):
                t.uniform_(0.95, 1.05, generator=gen)
            else:
                t.uniform_(-0.05, 0.05, generator=gen)


class Steady:
    def __init__(self, cfg: Config, url: str, w: WorkerProc, log: Any) -> None:
        from hotswap import HotswapSettings
        from publisher import Publisher

        self.cfg, self.w, self.log = cfg, w, log
        self.client = redis.Redis.from_url(url, socket_timeout=60)
        self.transport = baselines.raw_transport(self.client, cfg.window)
        # Default settings but where Redis is, and a socket timeout for a loaded host.
        self.settings: dict[str, Any] = {"redis_url": url, "socket_timeout": 60}
        config = HotswapSettings(**self.settings, _env_file=None)  # type: ignore[call-arg]
        self.pub = Publisher(MODEL, settings=config)
        self.samples: list[Sample] = []

    def close(self) -> None:
        self.pub.close()
        self.client.close()

    def start(self, sd: dict[str, torch.Tensor]) -> None:
        first = self.pub.publish(sd, message="base")
        self.w.call("agent_start", model_name=MODEL, settings=self.settings)
        self._applied(first)

    def _applied(self, version: int) -> dict[str, Any]:
        while True:
            ev = self.w.event("agent_applied")
            if ev["version"] >= version:
                return ev

    def hotswap(self, r: int, sd: dict[str, torch.Tensor], names: list[str]) -> Sample:
        t0 = time.monotonic()
        version = self.pub.publish(sd)
        t1 = time.monotonic()
        ev = self._applied(version)
        rep = ev["report"]
        return Sample(
            r,
            "hotswap",
            ev["t_done"] - t0,
            t1 - t0,
            fetch=rep["fetch_seconds"],
            validate=rep["validate_seconds"],
            pause=rep["apply_seconds"],
            to_fetch=rep["fetch_started"] - t1,
            rest=ev["t_done"]
            - rep["fetch_started"]
            - rep["fetch_seconds"]
            - rep["validate_seconds"]
            - rep["apply_seconds"],
            bytes_moved=rep["bytes_fetched"],
            tensors_delta=int(self.pub.last_report.tensors_delta),
        )

    def baseline(self, mode: str, r: int, sd: dict[str, torch.Tensor], names: list[str]) -> Sample:
        """``bare`` (the raw ceiling of ``bench.baselines``), ``naive`` (both on fresh
        keys) or ``naive-same`` (the naive loop over the same keys each round)."""
        chunk = int(self.cfg.chunk_mb * MiB)
        prefix = f"{mode}:{r}" if mode != "naive-same" else mode
        arm = "ceiling" if mode == "bare" else "naive"
        tag = f"{mode}:{r}".encode()
        self.w.call("arm", mode=arm, names=names, prefix=prefix, channel=CHANNEL, chunk=chunk)
        t0 = time.monotonic()
        if mode == "bare":
            baselines.ceiling_publish(
                self.client, self.transport, sd, names, chunk, prefix, CHANNEL, tag
            )
        else:
            baselines.naive_publish(self.client, sd, names, prefix, CHANNEL, tag)
        t1 = time.monotonic()
        ev = self.w.event("applied")
        return Sample(r, mode, ev["t_done"] - t0, t1 - t0, bytes_moved=ev["bytes"])

    def round(self, r: int, sd: dict[str, torch.Tensor], names: list[str]) -> None:
        order = APPROACHES[r % len(APPROACHES) :] + APPROACHES[: r % len(APPROACHES)]
        for approach in order:
            if approach == "hotswap":
                s = self.hotswap(r, sd, names)
            else:
                s = self.baseline(approach, r, sd, names)
            s.redis_used = int(self.client.info("memory")["used_memory"])
            self.samples.append(s)
        got = {s.approach: s for s in self.samples[-len(APPROACHES) :]}
        self.log(
            f"  round {r + 1}/{self.cfg.rounds}: "
            + ", ".join(f"{a} {got[a].end_to_end:.2f} s" for a in APPROACHES)
            + f" (agent fetch {got['hotswap'].fetch:.2f} s)"
        )


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """Every round, raw."""
    started, load = time.time(), os.getloadavg()
    size = int(cfg.size_mb * MiB)
    sd = model.build(size, torch.float32, cfg.seed)
    names = list(sd)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with EmbeddedRedis() as srv, WorkerProc() as w:
        w.call("init", url=srv.url, size=size, dtype="float32", seed=cfg.seed, window=cfg.window)
        bench = Steady(cfg, srv.url, w, log)
        try:
            bench.start(sd)
            for r in range(cfg.rounds):
                redraw(sd, gen)
                bench.round(r, sd, names)
            version = bench.client.info("server")["redis_version"]
        finally:
            w.call("agent_stop")
            bench.close()
    return {
        "config": asdict(cfg),
        "model_bytes": model.nbytes(sd),
        "redis_version": version,
        "samples": [asdict(s) for s in bench.samples],
        "seconds": time.time() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per approach, the two ratios and their verdicts."""
    med: dict[str, float] = {}
    for a in APPROACHES:
        med[a] = statistics.median(s["end_to_end"] for s in raw["samples"] if s["approach"] == a)
    bare, naive = med["hotswap"] / med["bare"], med["naive"] / med["hotswap"]
    return {
        "median": med,
        "hotswap_over_bare": bare,
        "naive_over_hotswap": naive,
        "targets": [
            {
                "target": "hotswap ÷ bare",
                "value": bare,
                "limit": BARE_RATIO,
                "met": bare <= BARE_RATIO,
            },
            {
                "target": "naive ÷ hotswap",
                "value": naive,
                "limit": NAIVE_RATIO,
                "met": naive >= NAIVE_RATIO,
            },
        ],
    }


def markdown(raw: dict[str, Any], summary: dict[str, Any]) -> str:
    cfg = raw["config"]
    rows = []
    for r in range(cfg["rounds"]):
        got = {s["approach"]: s for s in raw["samples"] if s["round"] == r}
        h = got["hotswap"]
        rows.append(
            [
                r + 1,
                f"{h['end_to_end']:.2f}",
                f"{h['publish']:.2f}",
                f"{h['to_fetch']:.2f}",
                f"{h['fetch']:.2f}",
                f"{h['validate']:.3f}",
                f"{h['pause']:.3f}",
                f"{h['rest']:.2f}",
                h["tensors_delta"],
                f"{got['naive']['end_to_end']:.2f}",
                f"{got['bare']['end_to_end']:.2f}",
                f"{got['naive-same']['end_to_end']:.2f}",
                f"{max(s['redis_used'] for s in got.values()) / 2**30:.1f}",
            ]
        )
    med = summary["median"]
    header = [
        "round",
        "hotswap s",
        "publish s",
        "return→fetch s",
        "agent fetch s",
        "validate s",
        "pause s",
        "rest s",
        "tensors as delta",
        "naive s",
        "bare s",
        "naive same keys s",
        "Redis GiB",
    ]
    lines = [
        f"## Steady-state full update: {raw['model_bytes'] / MiB:.0f} MiB float32, "
        f"every version kept, {cfg['rounds']} interleaved rounds",
        "",
        f"load {raw['load_before'][0]:.2f} before, {raw['load_after'][0]:.2f} after",
        "",
        table(header, rows),
        "",
        f"medians: hotswap {med['hotswap']:.2f} s, naive {med['naive']:.2f} s, "
        f"bare {med['bare']:.2f} s (naive over the same keys {med['naive-same']:.2f} s)",
        "",
    ]
    trows = [
        [
            t["target"],
            f"{t['value']:.2f}",
            f"{'≤' if t['target'].endswith('bare') else '≥'} {t['limit']:.1f}",
            "met" if t["met"] else "not met",
        ]
        for t in summary["targets"]
    ]
    lines.append(table(["target", "measured (medians)", "limit", "verdict"], trows))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__)
    p.add_argument("--size-mb", type=float, default=512, help="model size (default 512)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = Config(size_mb=args.size_mb, rounds=args.rounds)
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    raw = run(cfg, log=lambda m: print(m, flush=True))
    summary = summarize(raw)
    print()
    print(markdown(raw, summary))
    results.save("steady", {"raw": raw, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
