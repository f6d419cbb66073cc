"""``python -m bench.share_step``: one agent applying RL steps, host cache on and off.

A lone agent fills every blob of the host cache itself, so this is what
sharing costs the agent that fetches for the others. The model is the delta
bench's RL layout (``bench.delta_model.RlModel``); each version changes
``--fraction`` of the elements, so most tensors go as small deltas and the
agent's read-ahead (``hotswap.prefetch``) is what their fetch costs. The
modes alternate, ``--versions`` versions each per turn; per mode: the median
time from the publish call's start to ``on_applied``, and the GET commands
Redis ran per version (``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import redis

from bench.delta_model import RlModel
from hotswap import Agent, HotswapSettings
from hotswap.embedded import EmbeddedRedis
from publisher import Publisher

MiB = 1024 * 1024


def get_calls(client: Any) -> int:
    stat = client.info("commandstats").get("cmdstat_get", {})
    return int(stat.get("calls", 0))


def turn(
    srv: EmbeddedRedis, pub: Publisher, m: RlModel, shared: bool, versions: int, fraction: float
) -> tuple[list[float], list[int]]:
    """``versions`` RL steps applied by a fresh agent; per version, seconds and GETs."""
    base: dict[str, Any] = {"redis_url": srv.url, "namespace": "rl", "poll_interval": 5.0}
    folder = tempfile.mkdtemp(prefix="hotswap-share-", dir="/dev/shm")
    settings = HotswapSettings(
        **base,
        host_cache_dir=folder if shared else None,
        _env_file=None,  # type: ignore[call-arg]
    )
    live = {k: t.clone() for k, t in m.served.items()}
    done: dict[int, float] = {}
    landed = threading.Event()

    def applied(version: int, report: Any) -> None:
        done[version] = time.monotonic()
        landed.set()

    agent = Agent(live, "rl", settings=settings, on_applied=applied)
    times, gets = [], []
    client = redis.Redis.from_url(srv.url)
    try:
        agent.start()
        agent.wait_for(pub.publish(m.served), 60)  # runs the latest version first
        for _ in range(versions):
            m.step(fraction)
            before = get_calls(client)
            t0 = time.monotonic()
            v = pub.publish(m.served)
            agent.wait_for(v, 60)
            times.append(done[v] - t0)
            gets.append(get_calls(client) - before)
    finally:
        agent.stop()
        client.close()
        shutil.rmtree(folder, ignore_errors=True)
    return times, gets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.share_step", description=__doc__)
    p.add_argument("--size-mb", type=float, default=64)
    p.add_argument("--fraction", type=float, default=0.015, help="elements each step changes")
    p.add_argument("--versions", type=int, default=5, help="versions per mode per turn")
    p.add_argument("--turns", type=int, default=2, help="turns of off then on")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    out: dict[str, tuple[list[float], list[int]]] = {"off": ([], []), "on": ([], [])}
    with EmbeddedRedis() as srv:
        m = RlModel(int(args.size_mb * MiB), 0)
        pub = Publisher("rl", settings=HotswapSettings(redis_url=srv.url, namespace="rl"))
        try:
            pub.publish(m.served)
            for _ in range(args.turns):
                for mode in ("off", "on"):
                    times, gets = turn(srv, pub, m, mode == "on", args.versions, args.fraction)
                    out[mode][0].extend(times)
                    out[mode][1].extend(gets)
                    print(mode, [round(t * 1e3) for t in times], "GETs", gets, flush=True)
        finally:
            pub.close()
    for mode, (times, gets) in out.items():
        print(
            f"sharing {mode}: median {statistics.median(times) * 1e3:.0f} ms "
            f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}), "
            f"median {statistics.median(gets):.0f} GETs per version, n={len(times)}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
