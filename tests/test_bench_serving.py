"""``python -m bench --steady`` and ``python -m bench --serving`` at tiny sizes: issue 18's
benchmarks still run end to end and print their tables.

Timings are not checked here (they belong to the benchmarks' own reports);
only that every case ran, moved its bytes and was reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # Settings come from the arguments the benches pass, never from this environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        check=False,  # the exit status is asserted by the callers, with bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verdicts(out: str, targets: tuple[str, ...]) -> dict[str, str]:
    """Each target's row of the printed targets table, by target."""
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    got = {}
    for t in targets:
        assert t in rows, t
        got[t] = rows[t].rstrip(" |").rsplit("|", 1)[1].strip()
    return got


@pytest.mark.timeout(300)  # torch in two processes and a Redis on a shared machine
def test_steady_bench_runs_every_approach_each_round_and_prints_the_ratios(
    tmp_path: Path,
) -> None:
    results = tmp_path / "steady.json"
    done = bench("--steady", "--size-mb", "2", "--rounds", "2", "--json", str(results))
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    header = "| round | hotswap s | publish s | return→fetch s | agent fetch s | validate s |"
    assert header in out
    assert "| target | measured (medians) | limit | verdict |" in out
    got = verdicts(out, ("hotswap ÷ bare", "naive ÷ hotswap"))
    assert set(got.values()) <= {"met", "not met"}, got
    assert f"results: {results}" in out

    saved: dict[str, Any] = json.loads(results.read_text())
    raw = saved["raw"]
    assert raw["config"]["size_mb"] == 2 and raw["config"]["rounds"] == 2
    seen = sorted((s["round"], s["approach"]) for s in raw["samples"])
    approaches = ("hotswap", "naive", "bare", "naive-same")
    assert seen == sorted((r, a) for r in (0, 1) for a in approaches)
    for s in raw["samples"]:
        # Every approach moved the whole model each round: nothing went as a delta.
        assert s["bytes_moved"] >= raw["model_bytes"] > 0, s
        assert s["tensors_delta"] == 0 and s["redis_used"] > 0, s
    hot = [s for s in raw["samples"] if s["approach"] == "hotswap"]
    assert all(s["fetch"] > 0 and s["pause"] > 0 for s in hot), hot
    # Nothing deleted within the run: hotswap's three versions (the base and two
    # rounds), the bare script's two and the naive loop's two are all still in Redis.
    used = [s["redis_used"] for s in raw["samples"]]
    assert used[-1] >= 7 * raw["model_bytes"], used
    assert set(saved["summary"]["median"]) == set(approaches)


@pytest.mark.timeout(300)  # torch in two processes and a Redis on a shared machine
def test_serving_bench_reports_every_window_and_update_and_the_targets(tmp_path: Path) -> None:
    results = tmp_path / "serving.json"
    tiny = ["--size-mb", "2", "--updates", "1", "--idle-seconds", "0.3", "--gap-seconds", "0.1"]
    done = bench("--serving", *tiny, "--json", str(results))
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "| window | passes | p50 ms | p99 ms | max ms | passes/s | window s |" in out
    assert "| update | n | publish ms | return→applied ms | update ms |" in out
    for case in ("full", "one tensor", "delta"):
        assert f"| {case}: publish |" in out and f"| {case}: return→applied |" in out, case
    assert "| idle |" in out
    assert "GB/s of memory bandwidth" in out
    got = verdicts(
        out,
        (
            "full update: p50 during ÷ idle p50",
            "full update: p99 during ÷ idle p99",
            "one-tensor update: p99 during (ms)",
        ),
    )
    assert set(got.values()) <= {"met", "not met"}, got

    raw = json.loads(results.read_text())["raw"]
    assert raw["config"]["updates"] == 1
    ups = {u["case"]: u for u in raw["updates"]}
    assert set(ups) == {"full", "one tensor", "delta"}
    tensors = ups["full"]["tensors_changed"]
    assert tensors == 16  # 8 Linear layers, each a weight and a bias: all drawn again
    assert ups["full"]["tensors_delta"] == 0 and ups["full"]["bytes_fetched"] >= raw["model_bytes"]
    assert ups["one tensor"]["tensors_changed"] == 1
    # The delta case went as sparse deltas, patched in place under the writer lock.
    assert ups["delta"]["tensors_delta"] == ups["delta"]["tensors_patched"] == tensors
    for u in raw["updates"]:
        # (A small update can be applied before its publish returns: the agent
        # hears the commit, the publisher still writes its log entry.)
        assert u["t_publish"] < u["t_return"] and u["t_publish"] < u["t_applied"], u
    # The serving loop ran throughout: passes in the idle windows and after the last apply.
    assert len(raw["starts"]) == len(raw["ends"]) > 0
    assert raw["ends"][-1] > max(u["t_applied"] for u in raw["updates"])
    assert len(raw["idle"]) == 2


def test_serving_bench_refuses_an_unknown_case_before_starting_anything(tmp_path: Path) -> None:
    results = tmp_path / "serving.json"
    done = bench("--serving", "--cases", "full,bogus", "--json", str(results), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "error: --cases: bogus: choose from full, one tensor, delta"
    ), done.stderr
    assert done.stdout == "" and not results.exists()
