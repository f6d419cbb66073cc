"""``python -m bench --tune``: transfer speed by chunk size and GETs in flight.

Measures the lean transport (and redis-py's pipelined SET/GET for reference)
moving the whole state dict to fresh keys and back into touched memory, to
pick ``chunk_bytes`` and the transport's window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import torch

from bench import baselines, model
from bench.runner import Config
from bench.stats import summary, table
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
CHUNKS = [256 * 1024, MiB, 2 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
WINDOWS = [1, 2, 4, 8]


def _redis_py(client: redis.Redis, keys: list[str], views: list[memoryview]) -> tuple[float, float]:
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for k, v in zip(keys, views, strict=True):
        pipe.set(k, v)
    pipe.execute()
    t1 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    for v, got in zip(views, pipe.execute(), strict=True):
        v[:] = got
    return t1 - t0, time.perf_counter() - t1


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    sd = model.build(cfg.size, torch.float32, cfg.seed)
    dst = {k: torch.zeros_like(v) for k, v in sd.items()}
    names = list(sd)
    total = model.nbytes(sd)
    rows: list[dict[str, Any]] = []
    with EmbeddedRedis() as srv:
        client = redis.Redis.from_url(srv.url, socket_timeout=60)
        for chunk in CHUNKS:
            keys, views = baselines.chunked(sd, names, chunk, "t")
            _, outs = baselines.chunked(dst, names, chunk, "t")
            for window in WINDOWS:
                transport = baselines.raw_transport(client, window)
                sets, gets = [], []
                for _ in range(cfg.runs):
                    t0 = time.perf_counter()
                    transport.set_chunks(keys, views)
                    t1 = time.perf_counter()
                    transport.get_into(keys, outs)
                    gets.append(time.perf_counter() - t1)
                    sets.append(t1 - t0)
                    client.flushall()
                rows.append(_row("transport", chunk, window, total, sets, gets))
                log(_line(rows[-1]))
            sets, gets = [], []
            for _ in range(cfg.runs):
                s, g = _redis_py(client, keys, outs)
                sets.append(s)
                gets.append(g)
                client.flushall()
            rows.append(_row("redis-py", chunk, 0, total, sets, gets))
            log(_line(rows[-1]))
            if not torch.equal(dst["embed.weight"], sd["embed.weight"]):
                raise AssertionError("tune: bytes read back differ from those written")
        client.close()
    return {"size": total, "runs": cfg.runs, "rows": rows}


def _row(
    path: str, chunk: int, window: int, total: int, sets: list[float], gets: list[float]
) -> dict[str, Any]:
    s, g = summary(sets), summary(gets)
    return {
        "path": path,
        "chunk": chunk,
        "window": window,
        "set": s,
        "get": g,
        "set_gbps": total / s["median"] / 1e9,
        "get_gbps": total / g["median"] / 1e9,
        "both_gbps": total / (s["median"] + g["median"]) / 1e9,
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"  {r['path']:9s} chunk {r['chunk'] // 1024:6d} KiB window {r['window']}: "
        f"SET {r['set_gbps']:.2f} GB/s, GET {r['get_gbps']:.2f} GB/s, both {r['both_gbps']:.2f}"
    )


def markdown(raw: dict[str, Any]) -> str:
    rows = [
        [
            r["path"],
            r["chunk"] // 1024,
            r["window"] or "pipeline",
            f"{r['set_gbps']:.2f}",
            f"{r['get_gbps']:.2f}",
            f"{r['both_gbps']:.2f}",
        ]
        for r in raw["rows"]
    ]
    return table(
        ["path", "chunk KiB", "GETs in flight", "SET GB/s", "GET GB/s", "SET+GET GB/s"], rows
    )
