"""``python -m bench --quick`` at a tiny size, and ``python -m bench.flood --quick``: the
benchmarks behind every figure still run.

Timings are not checked here (they belong to the benchmark's own report);
this only proves that every case ran end to end and the report was printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_runs_every_case_and_prints_its_tables(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    # Settings come from the arguments bench passes, never from this environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    quick = ["--quick", "--size-mb", "2", "--runs", "1", "--json", str(results)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *quick],
        check=False,  # the exit status is asserted below, with bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    for header in (
        "| dtype | change | approach |",  # end to end, against the ceiling and naive
        "| dtype | change | approach | notice→fetch ms |",  # the agent's steps
        "| step | ms | GB/s |",  # each step alone
        "| target | measured (median) | limit |",
    ):
        assert header in out, header
    assert "Pub/sub notice" in out
    assert f"results: {results}" in out

    raw = json.loads(results.read_text())["raw"]
    assert raw["config"]["size_mb"] == 2 and raw["config"]["dtypes"] == ["float32"]
    cases = {r["case"] for r in raw["runs"]}
    assert {
        "ceiling:full",
        "ceiling-warm:full",
        "naive:full",
        "hotswap:full",
        "hotswap-kept:full",
    } <= cases
    assert {c for c in cases if c.startswith("hotswap:")} > {"hotswap:full"}  # the deltas ran
    for run in raw["runs"]:
        # Every approach moved the bytes it was asked to: nothing was skipped.
        assert run["bytes_moved"] >= run["bytes_changed"] > 0, run


@pytest.mark.timeout(300)  # four Python processes start torch on a shared machine
def test_quick_flood_bench_runs_both_flooded_cases_and_prints_its_table(tmp_path: Path) -> None:
    results = tmp_path / "flood.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.flood", "--quick", "--json", str(results)],
        check=False,  # the exit status is asserted below, with the bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| case | flood notices/s | passes/s |" in done.stdout
    assert "under the flood, the loop with an agent keeps" in done.stdout
    assert "publish→applied under the flood" in done.stdout
    cases = json.loads(results.read_text())
    assert [(c["flooded"], c["agent"]) for c in cases] == [(True, False), (True, True)]
    # Both loops served, the flood flowed, and the agent applied the version.
    assert all(c["passes"] and c["notices"] > 0 for c in cases)
    assert cases[1]["applied"] is not None and cases[0]["applied"] is None


@pytest.mark.timeout(300)  # torch in two processes, every case, on a shared machine
def test_quick_delta_bench_runs_every_case_and_prints_its_tables(tmp_path: Path) -> None:
    results = tmp_path / "deltas.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.deltas", "--quick", "--json", str(results)],
        check=False,  # the exit status is asserted below, with the bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    for header in (
        "| case | approach | steps | % changed |",  # bytes and end to end, every approach
        "| case | approach | publish ms | publish return→applied ms |",  # where the time goes
        "| case | approach | publisher peak extra | publisher base |",  # memory
        "| model | chain depth | ms | MiB fetched |",  # the late agents
        "| target | measured | limit |",
    ):
        assert header in out, header
    assert "Redis held by one model after each gc" in out
    assert f"results: {results}" in out

    raw = json.loads(results.read_text())["raw"]
    seen = {(s["case"], s["approach"]) for s in raw["samples"]}
    for case in ("rl-1.5%", "rl-1%", "rl-3%", "rl-8%", "fp32 fine-tune", "random new weights"):
        assert {(case, a) for a in ("delta", "full", "naive", "ceiling")} <= seen, case
    for s in raw["samples"]:
        # Every publish reached its agent (or the worker's shadow) and moved bytes.
        assert s["fetched"] > 0 and s["net_out"] > 0, s
    rl = [s for s in raw["samples"] if s["case"] == "rl-1.5%" and s["approach"] == "delta"]
    assert all(s["tensors_delta"] > 0 for s in rl)  # the RL steps went as deltas
    assert len(raw["held"]) == raw["config"]["versions"]
    # Both late agents reached head with the publisher's bytes.
    assert raw["late"]["delta"]["exact"] and raw["late"]["full"]["exact"]


@pytest.mark.timeout(300)  # two agents and a six-node cluster on a shared machine
def test_quick_fanout_bench_prints_every_row_of_its_table(tmp_path: Path) -> None:
    results = tmp_path / "fanout.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--fanout", "2", "--quick", "--json", str(results)],
        check=False,  # the exit status is asserted below, with the bench's stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "| topology | update | approach | MiB changed |" in out
    topologies = ("one node", "cluster 3 masters", "cluster 3+3 replica reads")
    for topology in topologies:
        for update in ("full", "one layer"):
            for approach in ("ceiling", "hotswap", "hotswap shared"):
                assert f"| {topology} | {update} | {approach} |" in out, (topology, update)
    assert "GETs masters / replicas |" in out
    assert "HOTSWAP_READ_FROM_REPLICAS" in out
    assert "CPU-bound" in out
    raw = json.loads(results.read_text())
    assert raw["config"]["agents"] == 2
    for s in raw["samples"]:
        # Both bare clients got every changed byte; the agents got bytes too (fewer
        # where the publisher stored a delta, the default).
        floor = 2 * s["bytes_changed"] if s["approach"] == "ceiling" else 2
        assert s["bytes_total"] >= floor > 0, s
        assert 0 < s["first"] <= s["last"], s
    # Sharing one fetch per host: Redis sent a full version once, not once per agent.
    sent = {
        (s["topology"], s["approach"]): s["server_sent"]
        for s in raw["samples"]
        if s["update"] == "full"
    }
    for topology in topologies:
        assert sent[topology, "hotswap shared"] < 0.75 * sent[topology, "hotswap"], sent
    # Replica reads: the replicas served the chunks (the masters only head and
    # manifests); without them, no replica served a GET.
    for s in raw["samples"]:
        if s["topology"] == "cluster 3+3 replica reads" and s["update"] == "full":
            assert s["gets_replicas"] > s["gets_masters"], s
        elif s["topology"] != "cluster 3+3 replica reads":
            assert s["gets_replicas"] == 0 < s["gets_masters"], s
