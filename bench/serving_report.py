"""``bench.serving``'s raw passes and updates to latency percentiles, targets and tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.stats import percentile, table

MiB = 1024 * 1024
CASES = ("full", "one tensor", "delta")
# The targets, against the idle passes of the same run.
FULL_P50 = 2.0
FULL_P99 = 3.0
ONE_P99 = 1.5

Window = tuple[float, float]


def latencies(raw: dict[str, Any], windows: Sequence[Window]) -> tuple[list[float], int]:
    """Durations of the passes that overlap any window, and how many ended inside one."""
    out: list[float] = []
    ended = 0
    for s, e in zip(raw["starts"], raw["ends"], strict=True):
        if any(s < b and e > a for a, b in windows):
            out.append(e - s)
        if any(a <= e < b for a, b in windows):
            ended += 1
    return out, ended


def _row(raw: dict[str, Any], windows: Sequence[Window]) -> dict[str, float]:
    lat, ended = latencies(raw, windows)
    span = sum(b - a for a, b in windows)
    return {
        "n": len(lat),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "max": max(lat, default=float("nan")),
        "per_second": ended / span if span > 0 else float("nan"),
        "seconds": span,
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per window kind: pass latency p50/p99/max and passes/s; per case: the updates' times."""
    rows: dict[str, dict[str, float]] = {"idle": _row(raw, [tuple(w) for w in raw["idle"]])}
    updates: dict[str, dict[str, float]] = {}
    for case in CASES:
        ups = [u for u in raw["updates"] if u["case"] == case]
        if not ups:
            continue
        rows[f"{case}: publish"] = _row(raw, [(u["t_publish"], u["t_return"]) for u in ups])
        # A small update can be applied before its publish returns (the publisher
        # still writes its log entry): its window is empty, not negative.
        applied = [(u["t_return"], max(u["t_return"], u["t_applied"])) for u in ups]
        rows[f"{case}: return→applied"] = _row(raw, applied)
        updates[case] = {
            "n": len(ups),
            "publish": _median([u["t_return"] - u["t_publish"] for u in ups]),
            "window": _median([u["t_applied"] - u["t_return"] for u in ups]),
            "window_min": min(u["t_applied"] - u["t_return"] for u in ups),
            "window_max": max(u["t_applied"] - u["t_return"] for u in ups),
            "update": _median([u["t_applied"] - u["t_publish"] for u in ups]),
            "fetch": _median([u["fetch"] for u in ups]),
            "validate": _median([u["validate"] for u in ups]),
            "pause": _median([u["pause"] for u in ups]),
            "pause_max": max(u["pause"] for u in ups),
            "bytes_fetched": _median([u["bytes_fetched"] for u in ups]),
            "tensors_changed": max(u["tensors_changed"] for u in ups),
            "tensors_delta": max(u["tensors_delta"] for u in ups),
            "tensors_patched": max(u["tensors_patched"] for u in ups),
        }
    idle = rows["idle"]
    targets: list[dict[str, Any]] = []

    def verdict(what: str, value: float, limit: float) -> None:
        targets.append({"target": what, "value": value, "limit": limit, "met": value <= limit})

    if "full: return→applied" in rows:
        full = rows["full: return→applied"]
        verdict("full update: p50 during ÷ idle p50", full["p50"] / idle["p50"], FULL_P50)
        verdict("full update: p99 during ÷ idle p99", full["p99"] / idle["p99"], FULL_P99)
    if "one tensor: return→applied" in rows:
        one = rows["one tensor: return→applied"]
        limit = ONE_P99 * idle["p99"] + updates["one tensor"]["pause"]
        verdict("one-tensor update: p99 during (ms)", one["p99"] * 1e3, limit * 1e3)
    return {
        "rows": rows,
        "updates": updates,
        "targets": targets,
        # What one pass streams from memory: the bandwidth the agent competes for.
        "pass_gbps": raw["model_bytes"] / idle["p50"] / 1e9 if idle["p50"] > 0 else 0.0,
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def markdown(raw: dict[str, Any], summary: dict[str, Any]) -> str:
    cfg = raw["config"]
    lines = [
        f"## Serving while updating: {raw['model_bytes'] / MiB:.0f} MiB of Linear layers "
        f"(width {raw['width']}), batch {cfg['batch']}, one torch thread; "
        f"{cfg['updates']} updates per case",
        "",
        f"load {raw['load_before'][0]:.2f} before, {raw['load_after'][0]:.2f} after",
        "",
    ]
    rows = [
        [
            k,
            r["n"],
            _ms(r["p50"]),
            _ms(r["p99"]),
            _ms(r["max"]),
            f"{r['per_second']:.1f}",
            f"{r['seconds']:.2f}",
        ]
        for k, r in summary["rows"].items()
    ]
    header = ["window", "passes", "p50 ms", "p99 ms", "max ms", "passes/s", "window s"]
    lines += [table(header, rows), ""]
    ups = [
        [
            case,
            u["n"],
            _ms(u["publish"]),
            f"{_ms(u['window'])} ({_ms(u['window_min'])}-{_ms(u['window_max'])})",
            _ms(u["update"]),
            _ms(u["fetch"]),
            _ms(u["validate"]),
            f"{_ms(u['pause'])} (max {_ms(u['pause_max'])})",
            f"{u['bytes_fetched'] / MiB:.1f}",
            f"{u['tensors_changed']}/{u['tensors_delta']}/{u['tensors_patched']}",
        ]
        for case, u in summary["updates"].items()
    ]
    header = [
        "update",
        "n",
        "publish ms",
        "return→applied ms",
        "update ms",
        "fetch ms",
        "validate ms",
        "pause ms",
        "MiB fetched",
        "changed/delta/patched",
    ]
    lines += [table(header, ups), ""]
    lines.append(
        f"a forward pass streams the model ({raw['model_bytes'] / MiB:.0f} MiB) in "
        f"{_ms(summary['rows']['idle']['p50'])} ms idle: {summary['pass_gbps']:.1f} GB/s "
        "of memory bandwidth the agent's fetch, hashing and copies compete for"
    )
    lines.append("")
    trows = [
        [t["target"], f"{t['value']:.2f}", f"{t['limit']:.2f}", "met" if t["met"] else "not met"]
        for t in summary["targets"]
    ]
    lines.append(table(["target", "measured", "limit", "verdict"], trows))
    return "\n".join(lines)
