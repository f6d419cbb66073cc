"""Runs every case against one throwaway Redis and collects the raw timings.

Two processes, as in production: this one publishes (ceiling, naive and the
real ``Publisher``), a worker process serves (ceiling and naive fetches, and a
real ``Agent`` applying into its live tensors). Runs interleave the three
approaches, rotating their order, so that drift on a shared machine hits all
of them alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import torch

from bench import baselines, components, model
from bench.baselines import DEFAULT_WINDOW
from bench.memory import PeakRss
from bench.procs import Listener, WorkerProc
from hotswap import HotswapSettings, keys, notice
from hotswap.embedded import EmbeddedRedis

MiB = 1024 * 1024
CHANNEL = "bench:notice"


@dataclass
class Config:
    size_mb: float = 512
    runs: int = 5
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    chunk_mb: float | None = None  # hotswap's chunk size; None: the settings default
    ceiling_chunk_mb: float = 1
    window: int = DEFAULT_WINDOW
    deltas: bool = True
    latency_messages: int = 300
    seed: int = 0

    @property
    def size(self) -> int:
        return int(self.size_mb * MiB)


@dataclass
class Run:
    """One publish-and-apply, all times in seconds from ``time.monotonic()``."""

    case: str
    dtype: str
    bytes_changed: int
    publish: float
    apply: float
    end_to_end: float
    bytes_moved: int = 0
    publisher_peak: int = 0
    agent_peak: int = 0
    fetch: float = 0.0
    validate: float = 0.0
    pause: float = 0.0
    notice_to_fetch: float = 0.0
    bytes_sent: int = 0


class Bench:
    def __init__(
        self, cfg: Config, redis_url: str, listener: Listener, log: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.listener = listener
        self._seq = 0
        self.url = redis_url
        self.log = log
        self.client = redis.Redis.from_url(redis_url, socket_timeout=60)
        self.transport = baselines.raw_transport(self.client, cfg.window)
        self.runs: list[Run] = []
        self.copies: dict[str, list[float]] = {}
        self.latency: list[float] = []
        self.components: dict[str, dict[str, float]] = {}
        self.first_publish_peak: dict[str, int] = {}

    # -- one dtype ----------------------------------------------------------------

    def run_dtype(self, dtype: str, with_deltas: bool) -> None:
        cfg = self.cfg
        sd = model.build(cfg.size, getattr(torch, dtype), cfg.seed)
        names = list(sd)
        settings = self._settings()
        with WorkerProc() as w:
            w.call(
                "init", url=self.url, size=cfg.size, dtype=dtype, seed=cfg.seed, window=cfg.window
            )
            if not self.latency:
                self.latency = self._notice_latency()
            from publisher import Publisher

            name = f"bench-{dtype}"
            pub = Publisher(name, settings=HotswapSettings(**settings, _env_file=None))  # type: ignore[call-arg]
            try:
                # The first publish in a fresh process: later ones reuse memory the
                # allocator kept, so only this one shows the publisher's full peak.
                mem = PeakRss().start()
                first = pub.publish(sd, message="base")
                self.first_publish_peak[dtype] = mem.stop()
                w.call("agent_start", model_name=name, settings=settings)
                self._wait_agent(w, first)
                for r in range(cfg.runs):
                    model.perturb(sd, names)
                    cases = [self._ceiling, self._naive, self._hotswap]
                    for case in cases[r % 3 :] + cases[: r % 3]:
                        self.runs.append(case(w, pub, sd, names, dtype, "full"))
                    pub.gc(keep=1)
                    self.log(f"  {dtype} full run {r + 1}/{cfg.runs}: " + self._last(3))
                self._kept_arena(w, pub, sd, names, dtype, name, settings)
                self.copies[f"{dtype}:full"] = w.call("bare_copy", names=names, reps=cfg.runs)
                head = pub.store.head()
                assert head is not None
                self.components[dtype] = components.measure(sd, pub.store.manifest_bytes(head))
                self.log(
                    f"  {dtype} components: "
                    + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.components[dtype].items())
                )
                if with_deltas:
                    for kind, changed in model.delta_names(sd).items():
                        self._delta(w, pub, sd, changed, dtype, kind)
                w.call("agent_stop")
            finally:
                pub.close()

    def _delta(
        self,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        changed: list[str],
        dtype: str,
        kind: str,
    ) -> None:
        for r in range(self.cfg.runs):
            model.perturb(sd, changed)
            self.runs.append(self._ceiling(w, pub, sd, changed, dtype, kind))
            self.runs.append(self._hotswap(w, pub, sd, changed, dtype, kind, only=True))
            model.perturb(sd, changed)
            self.runs.append(self._hotswap(w, pub, sd, changed, dtype, kind + "-scan"))
            pub.gc(keep=1)
            self.log(f"  {dtype} {kind} delta run {r + 1}/{self.cfg.runs}: " + self._last(3))
        self.copies[f"{dtype}:{kind}"] = w.call("bare_copy", names=changed, reps=self.cfg.runs * 4)

    def _kept_arena(
        self,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        names: list[str],
        dtype: str,
        model_name: str,
        settings: dict[str, Any],
    ) -> None:
        """Full updates again, the agent keeping its staging arena between versions
        (``HOTSWAP_STAGING_KEEP_BYTES`` over the model's size), as ``hotswap-kept``."""
        w.call("agent_stop")
        keep = {**settings, "staging_keep_bytes": 2 * self.cfg.size}
        w.call("agent_start", model_name=model_name, settings=keep)
        # One update first: the arena it leaves is what the measured runs reuse.
        model.perturb(sd, names)
        self._wait_agent(w, pub.publish(sd))
        for r in range(self.cfg.runs):
            model.perturb(sd, names)
            self.runs.append(self._hotswap(w, pub, sd, names, dtype, "full", label="hotswap-kept"))
            pub.gc(keep=1)
            self.log(f"  {dtype} full run {r + 1}/{self.cfg.runs}, arena kept: " + self._last(1))
        w.call("agent_stop")
        w.call("agent_start", model_name=model_name, settings=settings)

    def _last(self, n: int) -> str:
        return ", ".join(f"{x.case} {x.end_to_end * 1e3:.0f} ms" for x in self.runs[-n:])

    def _settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "redis_url": self.url,
            "namespace": "bench",
            "gc_grace_seconds": 0,
            "keep_versions": 1,
            "socket_timeout": 60,
            # This bench measures the full transfer path (whole tensors);
            # delta versions have their own, ``python -m bench.deltas``.
            "deltas": False,
        }
        if self.cfg.chunk_mb is not None:
            s["chunk_bytes"] = int(self.cfg.chunk_mb * MiB)
        return s

    @staticmethod
    def _wait_agent(w: WorkerProc, version: int) -> dict[str, Any]:
        while True:
            ev = w.event("agent_applied")
            if ev["version"] >= version:
                return ev

    # -- the three approaches -----------------------------------------------------

    def _baseline(
        self,
        mode: str,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        names: list[str],
        dtype: str,
        case: str,
        keep: bool = False,
        label: str = "",
    ) -> Run:
        """The raw ceiling or the naive approach, publish here and apply in the worker.

        The keys are deleted afterwards unless ``keep``: the next publish then
        writes fresh keys, as every real publish does, and Redis allocates anew.
        """
        chunk = int(self.cfg.ceiling_chunk_mb * MiB)
        self._seq += 1
        tag = f"{mode}:{self._seq}".encode()
        w.call("arm", mode=mode, names=names, prefix=mode, channel=CHANNEL, chunk=chunk)
        mem = PeakRss().start()
        t0 = time.monotonic()
        if mode == "ceiling":
            baselines.ceiling_publish(
                self.client, self.transport, sd, names, chunk, mode, CHANNEL, tag
            )
        else:
            baselines.naive_publish(self.client, sd, names, mode, CHANNEL, tag)
        t1 = time.monotonic()
        ev = w.event("applied")
        peak = mem.stop()
        t_notice = self.listener.when(CHANNEL, tag.__eq__)
        if not keep:
            self._delete(f"{mode}:*")
        size = model.nbytes(sd, names)
        return Run(
            f"{label or mode}:{case}",
            dtype,
            size,
            t1 - t0,
            ev["t_done"] - t_notice,
            ev["t_done"] - t0,
            bytes_moved=ev["bytes"],
            publisher_peak=peak,
            agent_peak=ev["peak_extra"],
            bytes_sent=size,
        )

    def _ceiling(
        self,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        names: list[str],
        dtype: str,
        case: str,
    ) -> Run:
        """The ceiling on fresh keys (returned), then again over the same keys (warm:
        Redis reuses the values' memory; recorded as ``ceiling-warm``)."""
        fresh = self._baseline("ceiling", w, pub, sd, names, dtype, case, keep=True)
        warm = self._baseline("ceiling", w, pub, sd, names, dtype, case, label="ceiling-warm")
        self.runs.append(warm)
        return fresh

    def _naive(
        self,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        names: list[str],
        dtype: str,
        case: str,
    ) -> Run:
        return self._baseline("naive", w, pub, sd, names, dtype, case)

    def _hotswap(
        self,
        w: WorkerProc,
        pub: Any,
        sd: dict[str, torch.Tensor],
        names: list[str],
        dtype: str,
        case: str,
        only: bool = False,
        label: str = "hotswap",
    ) -> Run:
        w.call("mem_arm")
        mem = PeakRss().start()
        t0 = time.monotonic()
        version = pub.publish(sd, only=names if only else None)
        t1 = time.monotonic()
        peak = mem.stop()
        ev = self._wait_agent(w, version)
        channel = keys.events_channel("bench", pub.model)
        t_notice = self.listener.when(channel, lambda b: notice.decode(b).version == version)
        rep = ev["report"]
        apply = ev["t_done"] - t_notice
        return Run(
            f"{label}:{case}",
            dtype,
            model.nbytes(sd, names),
            t1 - t0,
            apply,
            ev["t_done"] - t0,
            bytes_moved=rep["bytes_fetched"],
            publisher_peak=peak,
            agent_peak=ev["peak_extra"],
            fetch=rep["fetch_seconds"],
            validate=rep["validate_seconds"],
            pause=rep["apply_seconds"],
            # The agent's own clock of its first fetch: monotonic, like the notice's.
            notice_to_fetch=rep["fetch_started"] - t_notice,
            bytes_sent=int(pub.last_report.bytes_uploaded),
        )

    def _delete(self, pattern: str) -> None:
        batch = list(self.client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 1000):
            self.client.delete(*batch[i : i + 1000])

    # -- notices ------------------------------------------------------------------

    def _notice_latency(self) -> list[float]:
        """PUBLISH to a subscriber in another process, one small message at a time."""
        channel = "bench:latency"
        out = []
        for i in range(self.cfg.latency_messages):
            tag = str(i).encode()
            sent = time.monotonic()
            self.client.publish(channel, tag)
            out.append(self.listener.when(channel, tag.__eq__) - sent)
            time.sleep(0.001)
        return out


def run(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case, raw: the runs, the bare copies, the notice latencies."""
    started = time.time()
    load = os.getloadavg()
    with EmbeddedRedis() as srv:
        listener = Listener(srv.url)
        bench = Bench(cfg, srv.url, listener, log)
        version = bench.client.info("server")["redis_version"]
        for i, dtype in enumerate(cfg.dtypes):
            log(f"{dtype}: {cfg.size_mb:g} MiB state dict")
            bench.run_dtype(dtype, with_deltas=cfg.deltas and i == 0)
        bench.client.close()
        listener.close()
    return {
        "config": asdict(cfg),
        "redis_version": version,
        "runs": [asdict(r) for r in bench.runs],
        "bare_copy": bench.copies,
        "components": bench.components,
        "first_publish_peak": bench.first_publish_peak,
        "notice_latency": bench.latency,
        "seconds": time.time() - started,
        "load_before": load,
        "load_after": os.getloadavg(),
    }
