"""``python -m bench.serving``: forward-pass latency next to an agent, idle and during updates.

    python -m bench.serving [--size-mb 128] [--batch 8] [--updates 4] [--json PATH]

Two processes besides Redis (a throwaway redis-server): a serving process
(``bench.serving_worker``) runs forward passes of a stack of ``Linear``
layers continuously on one torch thread, each inside ``agent.reading()``,
with an embedded ``Agent`` (default settings) in the same process; this one
publishes with a ``Publisher`` (default settings) and, when each publish
returns, sends the serving process a marker over its stdin pipe.

Cases, interleaved round by round (``--updates`` rounds): idle (no update,
``--idle-seconds``), a full update (every tensor drawn again), a one-tensor
update (one weight matrix drawn again) and a delta update (1.5% of the elements
of every tensor changed: its own publisher stores sparse deltas). A case's
window runs from the publish's return to the agent's ``on_applied`` (the
agent's own work; the issue's targets are about it); the publish itself is
reported as its own window. No gc runs within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import results, serving_report
from bench.procs import WorkerProc
from bench.serving_worker import build
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
MODEL = "bench-serving"
CASES = ("full", "one tensor", "delta")
DELTA_FRACTION = 0.015


@dataclass
class Config:
    size_mb: float = 128
    batch: int = 8
    updates: int = 4
    idle_seconds: float = 2.0
    gap_seconds: float = 1.0
    seed: int = 0
    cases: tuple[str, ...] = CASES
    # Agent settings over the defaults (``--agent agent_nice=0``): what each costs.
    agent: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """One publish and its apply, times from ``time.monotonic()`` (seconds)."""

    case: str
    version: int
    t_publish: float
    t_return: float
    t_applied: float
    fetch: float
    validate: float
    pause: float
    bytes_fetched: int
    tensors_changed: int
    tensors_delta: int
    tensors_patched: int
    bytes_uploaded: int = 0
    keyframes: int = 0
    bases: dict[str, int] | None = None


def change(sd: dict[str, torch.Tensor], case: str, gen: torch.Generator) -> None:
    """Change ``sd`` in place as ``case`` says, never back to an earlier state."""
    with torch.no_grad():
        # New random weights, as PyTorch draws them, for the full and the one-tensor
        # cases: a constant step would go as a small delta, and these move every byte.
        bound = sd["0.weight"].shape[1] ** -0.5
        if case == "full":
            for t in sd.values():
                t.uniform_(-bound, bound, generator=gen)
        elif case == "one tensor":
            sd["0.weight"].uniform_(-bound, bound, generator=gen)
        elif case == "delta":
            for t in sd.values():
                flat = t.view(-1)
                count = max(1, round(flat.numel() * DELTA_FRACTION))
                at = torch.randint(0, flat.numel(), (count,), generator=gen)
                flat[at] += 2.0**-8
        else:
            raise ValueError(f"unknown case {case!r}: one of {CASES}")


def settings_for(url: str) -> dict[str, Any]:
    """Default settings but where Redis is (and a socket timeout for 2 cores under load)."""
    return {"redis_url": url, "socket_timeout": 60}


def _wait_applied(w: WorkerProc, version: int) -> dict[str, Any]:
    while True:
        ev = w.event("agent_applied")
        if ev["version"] >= version:
            return ev


def _idle(seconds: float, windows: list[tuple[float, float]]) -> None:
    a = time.monotonic()
    time.sleep(seconds)  # the idle window itself: nothing happens in it by design
    windows.append((a, time.monotonic()))


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """Every case, raw: each update's times and every forward pass's start and end."""
    from hotswap import HotswapSettings
    from publisher import Publisher

    started, load = time.time(), os.getloadavg()
    # Not the model's seed: the first draw would repeat its initial weights.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sd = {
        k: v.detach().clone()
        for k, v in build(int(cfg.size_mb * MiB), cfg.seed).state_dict().items()
    }
    updates: list[Update] = []
    idle: list[tuple[float, float]] = []
    with EmbeddedRedis() as srv, WorkerProc("bench.serving_worker") as w:
        settings = settings_for(srv.url)
        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]
        # Only the serving process's agent takes them; the publishers keep the defaults.
        settings = {**settings, **cfg.agent}
        # The delta case has its own publisher: one that has just seen every tensor
        # drawn again skips probing them for deltas for a few publishes
        # (publisher.base.MAX_SKIPS), and would send this case's tensors full.
        with Publisher(MODEL, settings=config) as pub, Publisher(MODEL, settings=config) as dpub:
            head = pub.publish(sd, message="base")
            info = w.call(
                "init",
                size=int(cfg.size_mb * MiB),
                batch=cfg.batch,
                model_name=MODEL,
                settings=settings,
                head=head,
            )
            w.call("start")
            for r in range(cfg.updates):
                _idle(cfg.idle_seconds, idle)
                # Rotated each round: drift on a shared machine hits every case alike.
                at = r % len(cfg.cases)
                for case in cfg.cases[at:] + cfg.cases[:at]:
                    change(sd, case, gen)
                    t0 = time.monotonic()
                    p = dpub if case == "delta" else pub
                    version = p.publish(sd)
                    t1 = time.monotonic()
                    if not p.last_report.created:
                        raise RuntimeError(f"{case}: the publish changed nothing")
                    w.call("marker", version=version, t=t1)
                    ev = _wait_applied(w, version)
                    rep, prep = ev["report"], p.last_report
                    updates.append(
                        Update(
                            case,
                            version,
                            t0,
                            t1,
                            ev["t_done"],
                            rep["fetch_seconds"],
                            rep["validate_seconds"],
                            rep["apply_seconds"],
                            rep["bytes_fetched"],
                            rep["tensors_changed"],
                            int(prep.tensors_delta),
                            rep["tensors_patched"],
                            int(prep.bytes_uploaded),
                            int(prep.keyframes),
                            dict(prep.bases),
                        )
                    )
                    log(
                        f"  round {r + 1}/{cfg.updates} {case}: publish {(t1 - t0) * 1e3:.0f} ms, "
                        f"return→applied {(ev['t_done'] - t1) * 1e3:.0f} ms"
                    )
                    time.sleep(cfg.gap_seconds)  # let the machine settle before the next case
            _idle(cfg.idle_seconds, idle)
            passes = w.call("stop")
    markers = {int(k): v for k, v in passes["markers"].items()}
    for u in updates:
        # The marker the serving process was sent is the publish's return.
        assert markers[u.version] == u.t_return, (u.version, markers.get(u.version))
    return {
        "config": asdict(cfg),
        "model_bytes": info["bytes"],
        "width": info["width"],
        "updates": [asdict(u) for u in updates],
        "idle": idle,
        "starts": passes["starts"],
        "ends": passes["ends"],
        "seconds": time.time() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    p.add_argument("--size-mb", type=float, default=128, help="model size (default 128)")
    p.add_argument("--batch", type=int, default=8, help="forward-pass batch (default 8)")
    p.add_argument("--updates", type=int, default=4, help="updates per case (default 4)")
    p.add_argument("--idle-seconds", type=float, default=2.0, help="each idle window")
    p.add_argument("--gap-seconds", type=float, default=1.0, help="pause after each update")
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES)
    )
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an agent setting over the defaults, e.g. agent_nice=0 or agent_threads=null",
    )
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = p.parse_args(argv)
    try:
        args.agent = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.agent)}
    except json.JSONDecodeError as e:
        p.error(f"--agent: a value is not JSON ({e})")
    args.cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        p.error(f"--cases: {', '.join(unknown) or 'none given'}: choose from {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = Config(
        args.size_mb,
        args.batch,
        args.updates,
        args.idle_seconds,
        args.gap_seconds,
        cases=args.cases,
        agent=args.agent,
    )
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    if cfg.agent:
        print(f"agent settings over the defaults: {cfg.agent}", flush=True)
    raw = run(cfg, log=lambda m: print(m, flush=True))
    summary = serving_report.summarize(raw)
    print()
    print(serving_report.markdown(raw, summary))
    results.save("serving", {"raw": raw, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
