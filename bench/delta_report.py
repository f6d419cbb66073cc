"""``bench.deltas``'s raw samples to ratios, issue 14's target verdicts and markdown tables.

"In+out" is what one publish moved through Redis: the publisher's upload
plus the agent's fetch. "% of full" divides the mean in+out of the delta
publishes of a case by the mean in+out of the full transfers (hotswap with
``deltas=False``) of the same case and run. Times compare medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.stats import ms, summary, table

MiB = 1024 * 1024
RL = "rl-1.5%"
FT = "fp32 fine-tune"
RANDOM = "random new weights"


def _of(raw: dict[str, Any], case: str, approach: str) -> list[dict[str, Any]]:
    return [s for s in raw["samples"] if s["case"] == case and s["approach"] == approach]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}, "targets": []}
    cases = list(dict.fromkeys(s["case"] for s in raw["samples"]))
    for case in cases:
        full = _of(raw, case, "full")
        full_io = _mean([s["uploaded"] + s["fetched"] for s in full])
        full_net = _mean([s["net_in"] + s["net_out"] for s in full])
        full_e2e = summary([s["end_to_end"] for s in full])["median"]
        naive_e2e = summary([s["end_to_end"] for s in _of(raw, case, "naive")])["median"]
        for approach in ("delta", "full", "naive", "ceiling"):
            runs = _of(raw, case, approach)
            if not runs:
                continue
            e2e = summary([s["end_to_end"] for s in runs])
            io = _mean([s["uploaded"] + s["fetched"] for s in runs])
            net = _mean([s["net_in"] + s["net_out"] for s in runs])
            out["cases"][f"{case}/{approach}"] = {
                "n": len(runs),
                "changed": _mean([s["changed"] for s in runs]),
                "uploaded": _mean([s["uploaded"] for s in runs]),
                "fetched": _mean([s["fetched"] for s in runs]),
                "io_pct": 100 * io / full_io,
                "net_pct": 100 * net / full_net,
                "publish": summary([s["publish"] for s in runs]),
                "end_to_end": e2e,
                "e2e_mean": _mean([s["end_to_end"] for s in runs]),
                "naive_x": naive_e2e / e2e["median"],
                "full_x": full_e2e / e2e["median"],
                "keyframes": sum(s["keyframes"] for s in runs),
                "tensors_delta": _mean([s["tensors_delta"] for s in runs]),
                "publisher_peak": max(s["publisher_peak"] for s in runs),
                "agent_peak": max(s["agent_peak"] for s in runs),
                "base_held": max(s["base_held"] for s in runs),
                "worst_vs_full": _worst(runs, full),
                "paired_vs_full": _paired(runs, full),
                "apply": summary([s["end_to_end"] - s["publish"] for s in runs]),
                "fetch": summary([s["fetch"] for s in runs]),
                "validate": summary([s["validate"] for s in runs]),
                "pause": summary([s["pause"] for s in runs]),
                "gc": summary([s["gc"] for s in runs]),
                "bases": _bases(runs),
                "cpu": {
                    k: summary([float(s.get(f"{k}_cpu", 0.0)) for s in runs])["median"]
                    for k in ("publisher", "agent", "redis")
                },
            }
    _held(out, raw)
    _targets(out, raw)
    return out


def _bases(runs: list[dict[str, Any]]) -> str:
    """Where the publisher's bases came from, added up over the runs ("memory 960")."""
    total: dict[str, int] = {}
    for r in runs:
        for k, v in r["bases"].items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k} {v}" for k, v in sorted(total.items()))


def _paired(runs: list[dict[str, Any]], full: list[dict[str, Any]]) -> float:
    """The median over steps of end to end / the full transfer's of the same step (nan:
    none paired): the two run side by side, so a load that drifts over the run moves
    both, where a ratio of medians over different steps moves with it."""
    by_step = {s["step"]: s["end_to_end"] for s in full}
    ratios = [s["end_to_end"] / by_step[s["step"]] for s in runs if s["step"] in by_step]
    return statistics.median(ratios) if ratios else float("nan")


def _worst(runs: list[dict[str, Any]], full: list[dict[str, Any]]) -> float:
    """The largest end to end / the full transfer's of the same step (nan: none paired)."""
    by_step = {s["step"]: s["end_to_end"] for s in full}
    ratios = [s["end_to_end"] / by_step[s["step"]] for s in runs if s["step"] in by_step]
    return max(ratios, default=float("nan"))


def _held(out: dict[str, Any], raw: dict[str, Any]) -> None:
    out["held"] = {
        f"{approach}_{k}": {
            "avg": _mean([h[f"{approach}_{k}"] for h in raw["held"] if f"{approach}_{k}" in h]),
            "max": max(
                (h[f"{approach}_{k}"] for h in raw["held"] if f"{approach}_{k}" in h),
                default=float("nan"),
            ),
        }
        for approach in ("delta", "full")
        for k in ("stored", "usage")
    }


def _verdict(
    what: str, value: float, limit: float, unit: str, above: bool = False
) -> dict[str, Any]:
    met = value >= limit if above else value <= limit
    sense = ">=" if above else "<="
    return {
        "target": what,
        "value": value,
        "limit": limit,
        "unit": unit,
        "met": met,
        "sense": sense,
    }


def _targets(out: dict[str, Any], raw: dict[str, Any]) -> None:
    c, t = out["cases"], out["targets"]
    rl = c.get(f"{RL}/delta")
    if rl:
        t.append(_verdict("bf16 RL 1.5%: in+out, reports, % of full", rl["io_pct"], 5, "%"))
        t.append(_verdict("bf16 RL 1.5%: in+out, Redis INFO, % of full", rl["net_pct"], 5, "%"))
        t.append(_verdict("bf16 RL 1.5%: naive / delta, end to end", rl["naive_x"], 5, "x", True))
        t.append(_verdict("bf16 RL 1.5%: full / delta, end to end", rl["full_x"], 2, "x", True))
    ft = c.get(f"{FT}/delta")
    if ft:
        t.append(_verdict("fp32 fine-tune: in+out, reports, % of full", ft["io_pct"], 70, "%"))
        t.append(_verdict("fp32 fine-tune: delta / full, end to end", 1 / ft["full_x"], 1, "x"))
        paired = ft["paired_vs_full"]
        t.append(_verdict("fp32 fine-tune: delta / full, same steps, median", paired, 1, "x"))
    rnd = c.get(f"{RANDOM}/delta")
    if rnd:
        t.append(_verdict("random weights: in+out / full's", rnd["io_pct"] / 100, 1.01, "x"))
        t.append(_verdict("random weights: delta / full, end to end", 1 / rnd["full_x"], 1.01, "x"))
        t.append(
            _verdict(
                "random weights: delta / full, same steps, median", rnd["paired_vs_full"], 1.01, "x"
            )
        )
    if raw["held"]:
        for k, how in (("stored", "STRLEN of blob chunks"), ("usage", "MEMORY USAGE")):
            h = out["held"][f"delta_{k}"]
            t.append(_verdict(f"Redis held ({how}), average x model", h["avg"], 1.5, "x"))
            t.append(_verdict(f"Redis held ({how}), max x model", h["max"], 2.2, "x"))
    late = raw.get("late") or {}
    if "delta" in late:
        ok = late["delta"]["exact"] and late["depth"] >= late["max_chain"]
        t.append(
            {
                "target": f"late agent bit-exact through a chain of MAX_CHAIN={late['max_chain']}",
                "value": late["depth"],
                "limit": late["max_chain"],
                "unit": "links",
                "met": ok,
                "sense": ">=",
            }
        )


def _mb(n: float) -> str:
    return f"{n / MiB:.2f}"


def markdown(raw: dict[str, Any], s: dict[str, Any]) -> str:
    cfg = raw["config"]
    parts = [
        f"{cfg['size_mb']:g} MiB models; RL run of {cfg['versions']} versions (full, naive "
        f"and ceiling every {cfg['compare_every']}), {cfg['runs']} steps of each other case; "
        f"gc keeps {cfg['keep']} versions after every publish (grace 0); Redis "
        f"{raw['redis_version']} over {raw.get('link', 'loopback')}; "
        f"load average {raw['load_before'][0]:.2f} before, "
        f"{raw['load_after'][0]:.2f} after; {raw['seconds']:.0f} s in all."
    ]
    rows = []
    for key, e in s["cases"].items():
        case, approach = key.split("/")
        rows.append(
            [
                case,
                approach,
                e["n"],
                f"{100 * e['changed']:.2f}",
                _mb(e["uploaded"]),
                _mb(e["fetched"]),
                f"{e['io_pct']:.2f}",
                f"{e['net_pct']:.2f}",
                ms(e["publish"]),
                ms(e["end_to_end"]),
                f"{e['naive_x']:.2f}",
                f"{e['full_x']:.2f}",
                e["keyframes"] if approach == "delta" else "",
            ]
        )
    header = ["case", "approach", "steps", "% changed", "MiB up", "MiB fetched"]
    header += ["in+out % of full", "INFO in+out % of full", "publish ms", "end to end ms"]
    parts.append(table([*header, "naive ÷ this", "full ÷ this", "keyframes"], rows))
    rows = [
        [
            *key.split("/"),
            ms(e["publish"]),
            ms(e["apply"]),
            ms(e["fetch"]),
            ms(e["validate"]),
            ms(e["pause"]),
            ms(e["gc"]),
            e["bases"],
        ]
        for key, e in s["cases"].items()
        if key.split("/")[1] in ("delta", "full")
    ]
    parts.append(
        "Where the time goes (median, min-max): the publish; from its return to the "
        "agent's applied callback; the agent's `ApplyReport` steps; the publisher's gc after "
        "the publish (not in end to end); the publisher's bases (tensors, all steps).\n\n"
        + table(
            [
                "case",
                "approach",
                "publish ms",
                "publish return→applied ms",
                "agent fetch+decode+hash ms",
                "validate ms",
                "pause ms",
                "gc after it ms",
                "bases",
            ],
            rows,
        )
    )
    rows = [
        [
            key.split("/")[0],
            key.split("/")[1],
            _mb(e["publisher_peak"]),
            _mb(e["base_held"]),
            _mb(e["agent_peak"]),
        ]
        for key, e in s["cases"].items()
        if key.split("/")[1] in ("delta", "full")
    ]
    parts.append(
        "Memory (MiB, max over the case's steps): the publisher's peak RSS over its "
        "baseline during a publish, the base it keeps (`PublishReport.base_held`: one copy "
        "of the published tensors), the serving process's peak RSS over its baseline "
        "during an apply.\n\n"
        + table(
            ["case", "approach", "publisher peak extra", "publisher base", "agent peak extra"], rows
        )
    )
    rows = []
    for key, e in s["cases"].items():
        cpu = e["cpu"]
        total = sum(cpu.values())
        rows.append(
            [
                *key.split("/"),
                *(f"{cpu[k] * 1e3:.1f}" for k in ("publisher", "agent", "redis")),
                f"{total * 1e3:.1f}",
                f"{total / 2 * 1e3:.1f}",
                f"{e['end_to_end']['median'] * 1e3:.1f}",
            ]
        )
    parts.append(
        "CPU time per step (ms, median over the case's steps, every thread): the publishing "
        "process over the publish, the serving process from arming to applied, the Redis "
        "server over both (`INFO cpu`). On 2 cores, end to end can be no shorter than "
        "the total over 2 where the three run at once, and is longer where they run in turn; "
        "CPU time moves less with a neighbour's load than wall time does.\n\n"
        + table(
            ["case", "approach", "publisher", "agent", "Redis", "total", "total / 2", "end to end"],
            rows,
        )
    )
    h = s["held"]
    if raw["held"]:
        parts.append(
            f"Redis held by one model after each gc of the RL run ({len(raw['held'])} "
            "versions), x the model's size, average / max: "
            f"deltas {h['delta_usage']['avg']:.2f} / {h['delta_usage']['max']:.2f} "
            f"(MEMORY USAGE of every key of the model), "
            f"{h['delta_stored']['avg']:.2f} / {h['delta_stored']['max']:.2f} (STRLEN of "
            f"its blob chunks); full blobs {h['full_usage']['avg']:.2f} / "
            f"{h['full_usage']['max']:.2f} (MEMORY USAGE), {h['full_stored']['avg']:.2f} / "
            f"{h['full_stored']['max']:.2f} (STRLEN; that model is published every "
            f"{cfg['compare_every']} steps only)."
        )
    late = raw.get("late") or {}
    if "delta" in late and "full" in late:
        full = late["full"]
        rows = [
            [
                approach,
                late["depth"] if approach == "delta" else 0,
                f"{late[approach]['seconds'] * 1e3:.0f}",
                _mb(late[approach]["fetched"]),
                f"{late[approach]['seconds'] / full['seconds']:.2f}",
                f"{late[approach]['fetched'] / full['fetched']:.2f}",
                "yes" if late[approach]["exact"] else "**no**",
            ]
            for approach in ("delta", "full")
        ]
        parts.append(
            "A late agent (zeros, started after the run reached head's chain depth), start to "
            "head applied:\n\n"
            + table(
                [
                    "model",
                    "chain depth",
                    "ms",
                    "MiB fetched",
                    "x full time",
                    "x full bytes",
                    "bit-exact",
                ],
                rows,
            )
        )
    rows = [
        [case, ", ".join(f"{k} {v}" for k, v in n.items())] for case, n in raw["storage"].items()
    ]
    parts.append(
        "How head's tensors are stored at the end of each case (entries per encoding):\n\n"
        + table(["case", "entries"], rows)
    )
    rows = [
        [
            t["target"],
            f"{t['value']:.2f} {t['unit']}",
            f"{t['sense']} {t['limit']:.2f} {t['unit']}",
            "target met" if t["met"] else "**target not met**",
        ]
        for t in s["targets"]
    ]
    parts.append(table(["target", "measured", "limit", ""], rows))
    return "\n\n".join(parts)
