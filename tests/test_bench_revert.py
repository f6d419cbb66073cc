"""``python -m bench.revert`` at a small size: the revert benchmark still runs and prints its
figures (timings are the benchmark's to report, never asserted here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_revert_bench_runs_and_prints_the_ratio_to_a_bare_copy() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    small = ["--changed-mib", "4", "--model-mib", "8", "--repeats", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.revert", *small],
        check=False,  # the exit status is asserted below, with the bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "revert of 4 MiB in a 8 MiB model, 2 runs" in done.stdout
    assert re.search(r"ratio \d+\.\d\d \(target <= 1\.5\): (met|not met)", done.stdout)


def test_revert_memory_bench_runs_and_prints_the_held_bytes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    small = ["--changed-mib", "4", "--model-mib", "8", "--versions", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.revert_memory", *small],
        check=False,  # the exit status is asserted below, with the bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "8 MiB model, versions rewriting 4 MiB, 2 steady-state versions" in done.stdout
    assert re.search(r"the revert bytes add -?\d+\.\d MiB \(-?\d+\.\d\dx", done.stdout)
