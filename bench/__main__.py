"""``python -m bench``: hotswap against the naive approach and the raw Redis ceiling."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import report, runner, tune
from bench.baselines import DEFAULT_WINDOW

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--size-mb", type=float, default=512, help="state dict size (default 512)")
    p.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    p.add_argument("--quick", action="store_true", help="64 MiB, 3 runs, float32 only")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    p.add_argument("--chunk-mb", type=float, default=None, help="hotswap chunk size")
    p.add_argument("--ceiling-chunk-mb", type=float, default=1.0, help="raw ceiling chunk size")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="GETs in flight")
    p.add_argument("--no-deltas", action="store_true", help="skip the delta cases")
    p.add_argument("--tune", action="store_true", help="sweep chunk size and window instead")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument("--fanout", type=int, metavar="N", help="N agents on one model (bench.fanout)")
    # Issue 18's two cases run after the others unless --quick, --tune or this.
    p.add_argument("--no-serving", action="store_true", help="skip bench.steady and bench.serving")
    p.add_argument(
        "--steady", action="store_true", help="only the steady-state case (bench.steady)"
    )
    p.add_argument(
        "--serving", action="store_true", help="only serving while updating (bench.serving)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if any(a == "--fanout" or a.startswith("--fanout=") for a in given):
        # N agent processes on one model: its own options (bench/fanout.py).
        from bench import fanout

        return fanout.main(given)
    # Each of issue 18's cases alone, with its own options (bench/steady.py, bench/serving.py).
    for flag, module in (("--steady", "steady"), ("--serving", "serving")):
        if flag in given:
            rest = [a for a in given if a != flag]
            return int(importlib.import_module(f"bench.{module}").main(rest))
    args = parse(argv)
    cfg = runner.Config(
        size_mb=args.size_mb,
        runs=args.runs,
        dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()],
        chunk_mb=args.chunk_mb,
        ceiling_chunk_mb=args.ceiling_chunk_mb,
        window=args.window,
        deltas=not args.no_deltas,
    )
    if args.quick:
        cfg.size_mb, cfg.runs, cfg.dtypes = min(cfg.size_mb, 64), min(cfg.runs, 3), ["float32"]
    info = machine()
    print(f"machine: {info['nproc']} cores, {info['cpu']}; load {os.getloadavg()[0]:.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.tune:
        raw = tune.run(cfg, log=lambda m: print(m, flush=True))
        text = tune.markdown(raw)
        result: dict[str, Any] = {"machine": info, "tune": raw}
    else:
        raw = runner.run(cfg, log=lambda m: print(m, flush=True))
        summary = report.summarize(raw)
        text = report.markdown(raw, summary)
        result = {"machine": info, "raw": raw, "summary": summary}
    print()
    print(text)
    path = args.json or RESULTS / f"{'tune' if args.tune else 'bench'}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nresults: {path}")
    if not (args.quick or args.tune or args.no_serving):
        # Serving while updating (issue 18) at their own default sizes.
        from bench import serving, steady

        print(flush=True)
        steady.main([])
        print(flush=True)
        serving.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
