"""``python -m bench --fanout N``: N agent processes on one model, one publish.

For each topology (one Redis node; a Redis Cluster of 3 masters, each with a
replica, built by the cluster fixture of ``tests/ha``, read from its masters;
the same cluster read from its replicas, ``HOTSWAP_READ_FROM_REPLICAS`` with
``HOTSWAP_WAIT_REPLICAS=1``) and each update (every tensor; one layer),
consecutive versions as users live them (default settings otherwise): the
time from the start of a publish to the LAST of N agents applied, and the
bytes all agents fetched per second of it, against the ceiling: the same
chunks written raw and fetched by N bare GET clients (from the replicas too
where the agents read them, after a ``WAIT 1`` on each master). Each update
is measured twice for hotswap, in one run: each agent fetching from Redis
("hotswap"), and the agents sharing one fetch per host through a host cache
folder on tmpfs ("hotswap shared", ``HOTSWAP_HOST_CACHE_DIR``): on one host,
sharing measures shared memory, not Redis, so the bytes Redis sent, and the
GETs masters and replicas served (``INFO commandstats``), are counted for
every case.

All processes share this machine's cores, so on a small machine the figure
is CPU-bound, not network-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import torch

from bench import baselines, model, results
from bench.procs import WorkerProc
from bench.stats import ms, summary, table
from hotswap import HotswapSettings
from hotswap.connection import connect
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
CHANNEL = "bench:fanout"
REPLICA_READS = "cluster 3+3 replica reads"
TOPOLOGIES = ("one node", "cluster 3 masters", REPLICA_READS)
UPDATES = ("full", "one layer")
APPROACHES = ("ceiling", "hotswap", "hotswap shared")
# Settings of the replica-read topology: the publisher waits for each master's
# replica before it commits and announces, so an agent finds every chunk there.
REPLICA_SETTINGS: dict[str, Any] = {"read_from_replicas": True, "wait_replicas": 1}


@dataclass
class Config:
    agents: int = 4
    size_mb: float = 128
    runs: int = 3
    dtype: str = "bfloat16"
    seed: int = 0
    topologies: list[str] = field(default_factory=lambda: list(TOPOLOGIES))
    redis_url: str | None = None  # a deployment to use instead of local servers

    @property
    def size(self) -> int:
        return int(self.size_mb * MiB)


@dataclass
class Sample:
    topology: str
    update: str
    approach: str  # one of APPROACHES
    publish: float  # seconds the publish (or the raw SETs) took
    first: float  # publish start to the first agent done
    last: float  # publish start to the last agent done
    bytes_total: int  # fetched by all agents together
    bytes_changed: int
    server_cpu: float = 0.0  # seconds of redis-server CPU (all nodes), the whole case
    server_sent: int = 0  # bytes Redis sent to clients (all nodes), the whole case
    gets_masters: int = 0  # GET commands the masters served, the whole case
    gets_replicas: int = 0  # GET commands the replicas served, the whole case


@contextlib.contextmanager
def redis_topology(name: str, url: str | None = None) -> Iterator[tuple[str, bool]]:
    """(HOTSWAP_REDIS_URL, cluster) of a fresh Redis of ``name``'s topology, or of
    the deployment at ``url`` (real hardware: ``name`` says whether it is a cluster)."""
    if url is not None:
        yield url, name == "cluster"
        return
    if name == "one node":
        with EmbeddedRedis() as srv:
            yield srv.url, False
        return
    # The cluster the failover tests use, reused as is (it lives with them).
    for where in (ROOT / "tests", ROOT / "tests" / "ha"):
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
    from cluster_support import Cluster  # type: ignore[import-not-found]

    with Cluster() as cluster:
        if name == REPLICA_READS:
            replicas_listed(cluster.urls())
        yield cluster.urls(), True


def server_cpu(nodes: list[redis.Redis]) -> float:
    """CPU seconds (user + sys) the Redis servers have used, all nodes (replicas too)."""
    infos = [n.info("cpu") for n in nodes]
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)


def server_sent(nodes: list[redis.Redis]) -> int:
    """Bytes the Redis servers have sent to clients (replication apart), all nodes."""
    infos = [n.info("stats") for n in nodes]
    # The total counts what masters send their replicas too (Redis 7): taken out.
    return sum(
        int(i["total_net_output_bytes"]) - int(i.get("total_net_repl_output_bytes", 0))
        for i in infos
    )


def replicas_listed(url: str, deadline: float = 30.0) -> None:
    """Wait until the cluster's slot map names a replica for every slot range: a
    client that learns the map before then reads those slots from their masters."""
    with redis.Redis.from_url(url.split(",", maxsplit=1)[0]) as node:
        end = time.monotonic() + deadline
        while any(len(r) < 4 for r in node.execute_command("CLUSTER SLOTS")):
            if time.monotonic() > end:
                raise RuntimeError("the cluster's replicas are not in its slot map")
            time.sleep(0.05)


def gets(nodes: list[redis.Redis]) -> tuple[int, int]:
    """GET commands served so far (``INFO commandstats``): by the masters, by the replicas.

    Asked of every node by address: a cluster client lists only the nodes it routes to.
    """
    served = [0, 0]
    for node in nodes:
        replica = node.info("replication")["role"] != "master"
        served[replica] += _gets(node.info("commandstats"))
    return served[0], served[1]


def node_clients(url: str) -> list[redis.Redis]:
    """A plain client of each node in ``url`` (one, or a cluster's comma-separated seeds)."""
    return [redis.Redis.from_url(u.strip()) for u in url.split(",") if u.strip()]


def _gets(info: dict[str, Any]) -> int:
    stat = info.get("cmdstat_get", {})
    return int(stat.get("calls", 0)) if isinstance(stat, dict) else 0


def wait_replicas(client: Any) -> None:
    """``WAIT 1`` on each master: every write so far is on a replica."""
    if isinstance(client, redis.cluster.RedisCluster):
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            client.get_redis_connection(node).execute_command("WAIT", 1, 2000)  # type: ignore[no-untyped-call]


def cache_folder() -> str:
    """A fresh host cache folder (0700), on tmpfs where the host has one."""
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix="hotswap-fanout-", dir=shm if os.path.isdir(shm) else None)


def layer_names(sd: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of one transformer layer (the middle one)."""
    return [n for n in sd if n.startswith(f"layers.{model.LAYERS // 2}.")]


class Fanout:
    def __init__(self, cfg: Config, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        self.samples: list[Sample] = []
        self._seq = 0

    def run_topology(self, topology: str) -> None:
        cfg = self.cfg
        sd = model.build(cfg.size, getattr(torch, cfg.dtype), cfg.seed)
        with redis_topology(topology, cfg.redis_url) as (url, cluster):
            # Defaults otherwise: what a user runs.
            settings: dict[str, Any] = {"redis_url": url, "cluster": cluster, "namespace": "bench"}
            if topology == REPLICA_READS:
                settings.update(REPLICA_SETTINGS)
            config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]
            client = connect(config)
            nodes = node_clients(url)
            chunks = baselines.chunk_io(client)
            workers = [WorkerProc("bench.fanout_worker") for _ in range(cfg.agents)]
            folder = cache_folder()
            from publisher import Publisher

            pub = Publisher("fanout", settings=config)
            try:
                for w in workers:
                    w.call("init", settings=settings, size=cfg.size, dtype=cfg.dtype, seed=cfg.seed)
                first = pub.publish(sd, message="base")
                for w in workers:
                    w.call("agent_start", model_name="fanout", settings=settings)
                self._all_applied(workers, first)
                for update in UPDATES:
                    names = list(sd) if update == "full" else layer_names(sd)
                    for r in range(cfg.runs):
                        cases: list[Callable[[], Sample]] = [
                            partial(self._ceiling, client, chunks, workers, sd, names, topology),
                            partial(self._hotswap, pub, workers, sd, names, None),
                            partial(self._hotswap, pub, workers, sd, names, folder),
                        ]
                        # Rotating which goes first, so that drift hits all alike.
                        pair = []
                        for case in cases[r % 3 :] + cases[: r % 3]:
                            # Read outside the timed span; counts the writes too.
                            cpu, sent = server_cpu(nodes), server_sent(nodes)
                            got = gets(nodes)
                            pair.append(case())
                            pair[-1].server_cpu = server_cpu(nodes) - cpu
                            pair[-1].server_sent = server_sent(nodes) - sent
                            now = gets(nodes)
                            pair[-1].gets_masters = now[0] - got[0]
                            pair[-1].gets_replicas = now[1] - got[1]
                        for s in pair:
                            s.topology, s.update = topology, update
                            s.bytes_changed = model.nbytes(sd, names)
                        self.samples += pair
                        self.log(
                            f"  {topology}, {update}, run {r + 1}/{cfg.runs}: "
                            + ", ".join(f"{s.approach} {s.last * 1e3:.0f} ms" for s in pair)
                        )
            finally:
                for w in workers:
                    w.close()
                pub.close()
                client.close()
                for node in nodes:
                    node.close()
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _all_applied(workers: list[WorkerProc], version: int) -> list[dict[str, Any]]:
        out = []
        for w in workers:
            while (ev := w.event("applied"))["version"] < version:
                pass
            out.append(ev)
        return out

    def _hotswap(
        self,
        pub: Any,
        workers: list[WorkerProc],
        sd: dict[str, torch.Tensor],
        names: list[str],
        folder: str | None,
    ) -> Sample:
        """A new version of ``names``; with ``folder``, the agents share their fetches."""
        model.perturb(sd, names)  # new bytes for each publish: an unchanged one creates nothing
        budget = 2 * self.cfg.size + 64 * MiB  # a version's bytes, and the next one's
        for w in workers:
            w.call("sharing", folder=folder, budget=budget)
        t0 = time.monotonic()
        version = pub.publish(sd)
        t1 = time.monotonic()
        done = self._all_applied(workers, version)
        ends = [ev["t_done"] - t0 for ev in done]
        moved = sum(int(ev["bytes"]) for ev in done)
        approach = "hotswap" if folder is None else "hotswap shared"
        return Sample("", "", approach, t1 - t0, min(ends), max(ends), moved, 0)

    def _ceiling(
        self,
        client: Any,
        chunks: baselines.ChunkIO,
        workers: list[WorkerProc],
        sd: dict[str, torch.Tensor],
        names: list[str],
        topology: str,
    ) -> Sample:
        """The same changed bytes, raw SETs then one PUBLISH; N bare clients GET them all
        (with replica reads: after a WAIT 1 on each master, from the replicas)."""
        self._seq += 1
        prefix = f"ceiling:{self._seq}"
        chunk = HotswapSettings(_env_file=None).chunk_bytes  # type: ignore[call-arg]
        for w in workers:
            w.call("arm", names=names, chunk=chunk, prefix=prefix, channel=CHANNEL)
        keys, views = baselines.chunked(sd, names, chunk, prefix)
        t0 = time.monotonic()
        chunks.set_chunks(keys, views)
        if topology == REPLICA_READS:
            wait_replicas(client)
        client.publish(CHANNEL, prefix)
        t1 = time.monotonic()
        done = [w.event("fetched") for w in workers]
        for key in keys:  # the next run writes fresh keys, as every publish does
            client.unlink(key)
        ends = [ev["t_done"] - t0 for ev in done]
        moved = sum(int(ev["bytes"]) for ev in done)
        return Sample("", "", "ceiling", t1 - t0, min(ends), max(ends), moved, 0)


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    started, load = time.time(), os.getloadavg()
    bench = Fanout(cfg, log)
    for topology in cfg.topologies:
        log(f"{topology}: {cfg.agents} agents, {cfg.size_mb:g} MiB {cfg.dtype}")
        bench.run_topology(topology)
    return {
        "config": asdict(cfg),
        "samples": [asdict(s) for s in bench.samples],
        "nproc": os.cpu_count(),
        "load_before": load,
        "load_after": os.getloadavg(),
        "seconds": time.time() - started,
    }


def markdown(raw: dict[str, Any]) -> str:
    """The table ``docs/scaling.md`` shows, with the caveats it needs."""
    cfg = raw["config"]
    samples = raw["samples"]
    rows = []
    for topology in cfg["topologies"]:
        for update in UPDATES:
            here = [s for s in samples if (s["topology"], s["update"]) == (topology, update)]
            got = {a: [s for s in here if s["approach"] == a] for a in APPROACHES}
            got = {a: runs for a, runs in got.items() if runs}
            ceil_last = summary([s["last"] for s in got["ceiling"]])["median"]
            for approach, runs in got.items():
                last = summary([s["last"] for s in runs])
                moved = max(s["bytes_total"] for s in runs)
                rate = moved / last["median"] / 1e9
                cpu = summary([s["server_cpu"] / (s["bytes_total"] / MiB) for s in runs])
                sent = summary([s.get("server_sent", 0) / MiB for s in runs])["median"]
                masters = summary([s.get("gets_masters", 0) for s in runs])["median"]
                replicas = summary([s.get("gets_replicas", 0) for s in runs])["median"]
                rows.append(
                    [
                        topology,
                        update,
                        approach,
                        f"{runs[0]['bytes_changed'] / MiB:.1f}",
                        f"{moved / cfg['agents'] / MiB:.1f}",
                        f"{summary([s['publish'] for s in runs])['median'] * 1e3:.0f}",
                        f"{summary([s['first'] for s in runs])['median'] * 1e3:.0f}",
                        ms(last),
                        f"{rate:.2f}",
                        f"{last['median'] / ceil_last:.2f}",
                        f"{cpu['median'] * 1e6:.0f}",
                        f"{sent:.1f}",
                        f"{masters:.0f} / {replicas:.0f}",
                    ]
                )
    head = (
        f"{cfg['agents']} agent processes, {cfg['size_mb']:g} MiB {cfg['dtype']} model, "
        f"{cfg['runs']} consecutive versions per case (median, min-max), default settings; "
        f"{raw['nproc']} cores, load average {raw['load_before'][0]:.2f} before, "
        f"{raw['load_after'][0]:.2f} after; {raw['seconds']:.0f} s in all."
    )
    where = (
        f"The publisher and all {cfg['agents']} agents share this host's {raw['nproc']} cores "
        "(Redis runs elsewhere). "
        if cfg.get("redis_url")
        else f"Redis, the publisher and all {cfg['agents']} agents share {raw['nproc']} cores: "
        "the figure is CPU-bound, not a network figure. "
    )
    caveats = (
        f"{where}"
        f"{REPLICA_READS}: the cluster of the row above, agents with "
        "HOTSWAP_READ_FROM_REPLICAS (blob chunks from replicas, head and manifests from "
        "masters) and a publisher with HOTSWAP_WAIT_REPLICAS=1; its ceiling's clients GET "
        "from the replicas after a WAIT 1 on each master. "
        "Server CPU: redis-server's user+sys seconds (all nodes, replicas too) over the case, "
        "writes included, per MiB the agents fetched (shared: from Redis or the host cache). "
        "MiB sent by Redis: what the servers (all nodes) sent to clients over the case "
        "(replication apart); hotswap shared: each blob read from Redis once per host, "
        "the other agents read it from the host cache folder (tmpfs). "
        "GETs masters / replicas: GET commands each kind of node served over the case "
        "(INFO commandstats; readers only, the writes are SETs)."
    )
    header = [
        "topology",
        "update",
        "approach",
        "MiB changed",
        "MiB fetched per agent",
        "publish ms",
        "publish→first done ms",
        "publish→last done ms",
        "aggregate GB/s",
        "x ceiling",
        "server CPU µs per MiB served",
        "MiB sent by Redis",
        "GETs masters / replicas",
    ]
    return "\n\n".join([head, table(header, rows), caveats])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --fanout N", description=__doc__)
    p.add_argument("--fanout", type=int, required=True, metavar="N", help="agent processes")
    p.add_argument("--size-mb", type=float, default=Config.size_mb, help="model size")
    p.add_argument("--runs", type=int, default=Config.runs, help="versions per case")
    p.add_argument("--dtype", default=Config.dtype, help="torch dtype of the model")
    p.add_argument("--quick", action="store_true", help="2 agents, 4 MiB, 1 run")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument(
        "--redis-url",
        default=None,
        help="measure this Redis instead of starting local ones (namespace bench, model "
        "fanout: HOTSWAP_NAMESPACE=bench hotswap delete fanout cleans up)",
    )
    p.add_argument("--cluster", action="store_true", help="--redis-url is a Redis Cluster")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = Config(agents=args.fanout, size_mb=args.size_mb, runs=args.runs, dtype=args.dtype)
    if args.redis_url:
        cfg.redis_url, cfg.topologies = args.redis_url, ["cluster" if args.cluster else "server"]
    if args.quick:
        cfg.agents, cfg.size_mb, cfg.runs = min(cfg.agents, 2), min(cfg.size_mb, 4), 1
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    raw = run(cfg, log=lambda m: print(m, flush=True))
    print()
    print(markdown(raw))
    results.save("fanout", raw, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
