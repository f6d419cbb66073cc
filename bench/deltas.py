"""``python -m bench.deltas``: delta versions against full transfers and the naive loop.

One run, one throwaway Redis, the agents in a separate serving process
(``bench.delta_worker``). Each step of a training loop is published three
ways from the same tensors: hotswap with deltas (default settings), hotswap
with ``deltas=False`` (today's full transfer, its own model and agent), and
the naive ``torch.save``-into-Redis loop (``bench.baselines``; the raw
ceiling too where the step is compared). Every publisher runs ``gc`` after
each publish, keeping ``--keep`` versions with no grace (the steady state).

Cases: a bf16 RL run (``--versions`` steps changing 1.5% of the served
elements; Redis memory measured after each gc; a late agent started when
head's chains reach ``MAX_CHAIN``), then RL steps changing 1%, 3% and 8%,
fp32 fine-tune steps and random new weights (``--runs`` each). Bytes in and
out of Redis come from the reports (publisher upload + agent fetch) and from
Redis ``INFO stats`` (every byte on the wire, all clients), both per publish.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from bench import baselines, delta_model, delta_report, results
from bench.delta_measure import RedisMeter, Sample, chain_depth
from bench.delta_worker import DeltaWorkerProc
from bench.memory import PeakRss
from bench.netlink import LinkedRedis
from hotswap import HotswapSettings, chain, codec, delta, encodings
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
CHANNEL = "bench:notice"
RL = "rl-1.5%"
FRACTIONS = (0.01, 0.03, 0.08)


# Seconds a late agent's heartbeat lives (see ``late_agent``).
LATE_HEARTBEAT_TTL = 1.0


@dataclass
class Config:
    size_mb: float = 64
    versions: int = 100
    runs: int = 6
    keep: int = 10
    compare_every: int = 10
    window: int = baselines.DEFAULT_WINDOW
    seed: int = 0


class Pair:
    """One model published with deltas and the same one with full blobs, each with an agent."""

    def __init__(self, bench: DeltaBench, name: str, sd: dict[str, torch.Tensor]) -> None:
        from publisher import Publisher

        self.bench, self.name, self.sd = bench, name, sd
        dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        shapes = [(n, list(t.shape)) for n, t in sd.items()]
        self.pubs: dict[str, Any] = {}
        for approach, deltas in (("delta", True), ("full", False)):
            tag = f"{name}-{approach}"
            settings = {**bench.settings, "deltas": deltas}
            config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]
            self.pubs[approach] = Publisher(tag, settings=config)
            bench.w.call("build", tag=tag, shapes=shapes, dtype=dtype)
            first = self.pubs[approach].publish(sd, message="base")
            bench.w.call("start", tag=tag, model_name=tag, settings=settings)
            bench.w.applied(tag, first)
        bench.w.call("use_shadow", tag=f"{name}-full")
        self.size = delta_model.nbytes(sd)

    def close(self) -> None:
        for approach, pub in self.pubs.items():
            self.bench.w.call("drop", tag=f"{self.name}-{approach}")
            pub.close()


class DeltaBench:
    def __init__(self, cfg: Config, url: str, w: DeltaWorkerProc, log: Callable[[str], None]):
        self.cfg, self.url, self.w, self.log = cfg, url, w, log
        self.client = redis.Redis.from_url(url, socket_timeout=60)
        self.transport = baselines.raw_transport(self.client, cfg.window)
        self.meter = RedisMeter(self.client, "bench")
        self.settings: dict[str, Any] = {
            "redis_url": url,
            "namespace": "bench",
            "gc_grace_seconds": 0,
            "keep_versions": cfg.keep,
            "socket_timeout": 60,
        }
        self.samples: list[Sample] = []
        self.held: list[dict[str, float]] = []
        self.late: dict[str, Any] = {}
        self.storage: dict[str, dict[str, int]] = {}
        self._seq = self._step = 0
        w.call("connect", url=url, window=cfg.window)

    # -- one publish, each approach ------------------------------------------------

    def hotswap(self, pair: Pair, approach: str, case: str, changed: float) -> Sample:
        pub, tag = pair.pubs[approach], f"{pair.name}-{approach}"
        self.w.call("mem_arm")
        mem = PeakRss().start()
        net, server_cpu = self.meter.net(), self.meter.cpu()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        version = pub.publish(pair.sd)
        t1 = time.monotonic()
        cpu1 = time.process_time()
        peak = mem.stop()
        ev = self.w.applied(tag, version)
        moved = self.meter.net_since(net)
        redis_cpu = self.meter.cpu() - server_cpu
        rep, got = pub.last_report, ev["report"]
        started = time.monotonic()
        pub.gc(keep=self.cfg.keep)
        collected = time.monotonic() - started
        return Sample(
            case=case,
            approach=approach,
            version=version,
            changed=changed,
            size=pair.size,
            publish=t1 - t0,
            end_to_end=ev["t_done"] - t0,
            uploaded=int(rep.bytes_uploaded),
            fetched=int(got["bytes_fetched"]),
            net_in=moved[0],
            net_out=moved[1],
            publisher_peak=peak,
            agent_peak=int(ev["peak_extra"]),
            base_held=int(getattr(rep, "base_held", 0)),
            tensors_delta=int(getattr(rep, "tensors_delta", 0)),
            keyframes=int(getattr(rep, "keyframes", 0)),
            gc=collected,
            fetch=float(got["fetch_seconds"]),
            validate=float(got["validate_seconds"]),
            pause=float(got["apply_seconds"]),
            bytes_delta=int(getattr(rep, "bytes_delta", 0)),
            bases=dict(getattr(rep, "bases", {})),
            publisher_cpu=cpu1 - cpu0,
            agent_cpu=float(ev["cpu"]),
            redis_cpu=redis_cpu,
        )

    def baseline(self, pair: Pair, mode: str, case: str, changed: float) -> Sample:
        """The naive loop or the raw ceiling, published here, applied in the worker's shadow."""
        names, chunk = list(pair.sd), MiB
        self._seq += 1
        tag = f"{mode}:{self._seq}".encode()
        self.w.call("arm", mode=mode, names=names, prefix=mode, channel=CHANNEL, chunk=chunk)
        mem = PeakRss().start()
        net, server_cpu = self.meter.net(), self.meter.cpu()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        if mode == "ceiling":
            baselines.ceiling_publish(
                self.client, self.transport, pair.sd, names, chunk, mode, CHANNEL, tag
            )
        else:
            baselines.naive_publish(self.client, pair.sd, names, mode, CHANNEL, tag)
        t1 = time.monotonic()
        cpu1 = time.process_time()
        peak = mem.stop()
        ev = self.w.event("applied")
        moved = self.meter.net_since(net)
        redis_cpu = self.meter.cpu() - server_cpu
        self.meter.delete(f"{mode}:*")
        got = int(ev["bytes"])
        return Sample(
            case=case,
            approach=mode,
            version=0,
            changed=changed,
            size=pair.size,
            publish=t1 - t0,
            end_to_end=ev["t_done"] - t0,
            uploaded=got,
            fetched=got,
            net_in=moved[0],
            net_out=moved[1],
            publisher_peak=peak,
            agent_peak=int(ev["peak_extra"]),
            publisher_cpu=cpu1 - cpu0,
            agent_cpu=float(ev["cpu"]),
            redis_cpu=redis_cpu,
        )

    def tally(self, pair: Pair, case: str) -> None:
        """How head's tensors are stored: entries per delta encoding, full, keyframe."""
        m = pair.pubs["delta"].store.head_manifest()
        count: dict[str, int] = {}
        for e in m.tensors if m is not None else ():
            kind = "full" if e.delta is None else "+".join(e.delta.encodings)
            if e.delta is not None and e.delta.keyframe:
                kind += " (keyframe)"
            count[kind] = count.get(kind, 0) + 1
        self.storage[case] = count

    def step(self, pair: Pair, case: str, changed: float, compare: bool, turn: int) -> None:
        """Publish the current tensors with deltas and, if ``compare``, every other way
        (the order rotating with ``turn``, so that drift on a shared machine hits all)."""
        order = ["delta", "full", "naive", "ceiling"] if compare else ["delta"]
        k = turn % len(order)
        self._step += 1
        for approach in order[k:] + order[:k]:
            if approach in pair.pubs:
                sample = self.hotswap(pair, approach, case, changed)
            else:
                sample = self.baseline(pair, approach, case, changed)
            sample.step = self._step
            self.samples.append(sample)
        last = self.samples[-len(order) :]
        self.log(
            f"  {case} step {turn + 1}: {changed:.2%} changed; "
            + ", ".join(f"{s.approach} {s.end_to_end * 1e3:.0f} ms" for s in last)
        )

    # -- the cases ------------------------------------------------------------------

    def rl(self) -> None:
        cfg = self.cfg
        model = delta_model.RlModel(int(cfg.size_mb * MiB), cfg.seed)
        pair = Pair(self, "rl", model.served)
        self.log(f"rl: {pair.size / MiB:.1f} MiB bf16, {len(pair.sd)} tensors")
        try:
            for i in range(cfg.versions):
                before = {k: v.clone() for k, v in model.served.items()}
                model.step(0.015)
                changed = delta_model.changed_fraction(before, model.served)
                compare = i % cfg.compare_every == 0
                self.step(pair, RL, changed, compare=compare, turn=i)
                held: dict[str, float] = {"version": i + 2}  # v1 was the first, full publish
                # The full model changes at compare steps only: measured then.
                for approach in ("delta", "full") if compare else ("delta",):
                    for k, v in self.meter.held(f"rl-{approach}", pair.size).items():
                        held[f"{approach}_{k}"] = v
                self.held.append(held)
                depth = chain_depth(pair.pubs["delta"].store.head_manifest())
                if not self.late and (depth >= chain.MAX_CHAIN or i == cfg.versions - 1):
                    self.late_agent(pair, depth)
            self.tally(pair, RL)
            for fraction in FRACTIONS:
                case = f"rl-{fraction:.0%}"
                for i in range(cfg.runs):
                    before = {k: v.clone() for k, v in model.served.items()}
                    model.step(fraction)
                    changed = delta_model.changed_fraction(before, model.served)
                    self.step(pair, case, changed, compare=True, turn=i)
                self.tally(pair, case)
            self.w.call("digests", tag="rl-delta")  # the steady agent still answers
            self.check_exact(pair, "rl-delta")
        finally:
            pair.close()

    def late_agent(self, pair: Pair, depth: int) -> None:
        """A fresh agent (zeros) for each model, started now: to head, bit-exact?"""
        # The full model's head must hold the same content, so both reach the same bytes.
        full = pair.pubs["full"]
        head = full.store.head()
        if full.publish(pair.sd) != head:
            self.w.applied("rl-full", full.store.head())
            full.gc(keep=self.cfg.keep)
        out: dict[str, Any] = {"depth": depth, "max_chain": chain.MAX_CHAIN}
        shapes = [(n, list(t.shape)) for n, t in pair.sd.items()]
        for approach in ("delta", "full"):
            model_name, tag = f"rl-{approach}", f"late-{approach}"
            head = pair.pubs[approach].store.head()
            self.w.call("build", tag=tag, shapes=shapes, dtype="bfloat16")
            net = self.meter.net()
            t0 = time.monotonic()
            # A heartbeat that outlives the agent by a second, not the default: once
            # dropped it no longer pins the version it ran, which would keep that
            # version's keyframe past the next one (Redis held is the 10 kept versions').
            late = {**self.settings, "heartbeat_ttl": LATE_HEARTBEAT_TTL}
            self.w.call("start", tag=tag, model_name=model_name, settings=late)
            ev = self.w.applied(tag, head)
            moved = self.meter.net_since(net)
            out[approach] = {
                "seconds": ev["t_done"] - t0,
                "fetched": int(ev["report"]["bytes_fetched"]),
                "net_out": moved[1],
                "exact": self.exact(pair, tag),
            }
            self.w.call("drop", tag=tag)
        self.late = out
        self.log(f"  late agents at chain depth {depth}: {out}")

    def exact(self, pair: Pair, tag: str) -> bool:
        theirs = self.w.call("digests", tag=tag)
        ours = {n: codec.digest(codec.as_bytes(t)) for n, t in pair.sd.items()}
        return bool(theirs == ours)

    def check_exact(self, pair: Pair, tag: str) -> None:
        if not self.exact(pair, tag):
            raise SystemExit(f"bench.deltas: agent {tag} does not hold the published bytes")

    def simple(
        self, name: str, case: str, sd: dict[str, torch.Tensor], step: Callable[[], None]
    ) -> None:
        """``--runs`` steps of one kind, every approach at each."""
        pair = Pair(self, name, sd)
        self.log(f"{name}: {pair.size / MiB:.1f} MiB, {len(sd)} tensors")
        try:
            for i in range(self.cfg.runs):
                before = {k: v.clone() for k, v in sd.items()}
                step()
                self.step(pair, case, delta_model.changed_fraction(before, sd), True, i)
            self.tally(pair, case)
            self.check_exact(pair, f"{name}-delta")
        finally:
            pair.close()

    def run(self) -> None:
        size, seed = int(self.cfg.size_mb * MiB), self.cfg.seed
        self.rl()
        gen = torch.Generator().manual_seed(seed + 1)
        ft = delta_model.weights(size, torch.float32, seed)
        self.simple("ft", "fp32 fine-tune", ft, lambda: delta_model.finetune_step(ft, gen))
        rnd = delta_model.weights(size, torch.bfloat16, seed)
        self.simple("rand", "random new weights", rnd, lambda: delta_model.random_step(rnd, gen))


def chosen_settings() -> dict[str, Any]:
    """The delta settings and constants this run used (the defaults)."""
    defaults = HotswapSettings(_env_file=None)  # type: ignore[call-arg]
    return {
        "chunk_bytes": defaults.chunk_bytes,
        "deltas": defaults.deltas,
        "delta_base": defaults.delta_base,
        "max_chain": chain.MAX_CHAIN,
        "keyframe_fraction": chain.KEYFRAME_FRACTION,
        "sparse_max_fraction": encodings.SPARSE_MAX_FRACTION,
        "zstd_level": encodings.ZSTD_LEVEL,
        "max_delta_fraction": delta.MAX_DELTA_FRACTION,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.deltas", description=__doc__)
    p.add_argument("--size-mb", type=float, default=64, help="model size (default 64)")
    p.add_argument("--versions", type=int, default=100, help="versions of the 1.5%% RL run")
    p.add_argument("--runs", type=int, default=6, help="steps of every other case (default 6)")
    p.add_argument("--keep", type=int, default=10, help="versions gc keeps (default 10)")
    p.add_argument("--compare-every", type=int, default=10, help="RL run steps per full/naive")
    p.add_argument("--quick", action="store_true", help="4 MiB, 6 versions, 2 runs: seconds")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument(
        "--link",
        default=None,
        metavar="RATE",
        help="Redis behind a veth pair in its own network namespace, held to RATE "
        "(a tc rate: 1gbit, 10gbit) or 'veth' for no limit (root, iproute2; bench.netlink)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import machine

    args = parse(argv)
    cfg = Config(args.size_mb, args.versions, args.runs, args.keep, args.compare_every)
    if args.quick:
        cfg.size_mb, cfg.versions, cfg.runs, cfg.compare_every = 4, 6, 2, 3
    info = machine()
    load = os.getloadavg()
    print(f"machine: {info['nproc']} cores, {info['cpu']}; load {load[0]:.2f}", flush=True)
    started = time.time()
    server: EmbeddedRedis | LinkedRedis = (
        EmbeddedRedis()
        if args.link is None
        else LinkedRedis(None if args.link == "veth" else args.link)
    )
    link = "loopback" if isinstance(server, EmbeddedRedis) else server.label
    print(f"redis: {link}", flush=True)
    with server as srv, DeltaWorkerProc() as w:
        bench = DeltaBench(cfg, srv.url, w, log=lambda m: print(m, flush=True))
        bench.run()
        version = bench.client.info("server")["redis_version"]
    raw = {
        "machine": info,
        "config": asdict(cfg),
        "settings": chosen_settings(),
        "redis_version": version,
        "link": link,
        "samples": [asdict(s) for s in bench.samples],
        "held": bench.held,
        "late": bench.late,
        "storage": bench.storage,
        "seconds": time.time() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
    }
    summary = delta_report.summarize(raw)
    print()
    print(delta_report.markdown(raw, summary))
    results.save("deltas", {"raw": raw, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
