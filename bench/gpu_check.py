"""GPU check of the agent: a CUDA model updated in place with pinned and device staging.

    python -m bench.gpu_check [--mib 256] [--versions 20]

For each staging mode: a CUDA model (float32 blocks, a bfloat16 tensor and a
buffer) takes ``--versions`` versions through a real Publisher, Redis and
Agent while two reader threads launch kernels inside ``reading()``. Checks:
every ``data_ptr()`` unchanged, the final weights bit-equal to the manifest,
no reader saw two versions at once. Prints the timings as a markdown table.
Exits 0 with "no CUDA, skipped" where torch sees no GPU, 1 if a check failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from hotswap import Agent, ApplyReport, HotswapSettings, codec
from hotswap.embedded import EmbeddedRedis
from hotswap.staging import Staging
from publisher import Publisher

MiB = 1024 * 1024
BASE = 100.0  # version k fills every tensor with BASE + k: ratios stay near 1
NAME = "bench-gpu-check"


class CudaModel(torch.nn.Module):
    def __init__(self, total_bytes: int, count: int, device: torch.device) -> None:
        super().__init__()
        rows = max(1, total_bytes // count // 4096)
        self.blocks = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(rows, 1024, device=device)) for _ in range(count)
        )
        self.low = torch.nn.Parameter(torch.zeros(256, 1024, dtype=torch.bfloat16, device=device))
        self.register_buffer("offset", torch.zeros(1024, device=device))


def filled(model: torch.nn.Module, version: int) -> dict[str, torch.Tensor]:
    """Version ``version`` as CPU tensors (what a publisher would hold)."""
    return {
        k: torch.full(v.shape, BASE + version, dtype=v.dtype) for k, v in model.state_dict().items()
    }


class Readers:
    """Threads that sum every tensor inside ``reading()``; a pass with unequal means mixed."""

    def __init__(self, agent: Agent, model: torch.nn.Module, count: int = 2) -> None:
        self.agent, self.model = agent, model
        self.passes = 0
        self.mixed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def _run(self) -> None:
        tensors = list(self.model.state_dict().values())
        while not self._stop.is_set():
            with self.agent.reading(), torch.no_grad():
                # Kernels are only queued here; the agent must wait for them.
                means = torch.stack([t.float().mean() for t in tensors])
            values = means.tolist()
            self.passes += 1
            if max(values) != min(values):
                self.mixed += 1

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_copy(
    model: torch.nn.Module, sources: dict[str, torch.Tensor], device: torch.device
) -> float:
    live = model.state_dict()
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for k, src in sources.items():
            live[k].copy_(src, non_blocking=True)
    sync(device)
    return time.perf_counter() - start


def check_mode(
    staging: Staging, settings: HotswapSettings, mib: int, versions: int, device: torch.device
) -> tuple[list[str], dict[str, float]]:
    model = CudaModel(mib * MiB, 8, device)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    reports: list[ApplyReport] = []
    failures: list[str] = []
    pub = Publisher(NAME, settings=settings)
    pub.store.delete_all()
    agent = Agent(
        model,
        NAME,
        settings=settings,
        staging=staging,
        on_applied=lambda v, r: reports.append(r),
    )
    with agent, Readers(agent, model) as readers:
        last = 0
        for k in range(1, versions + 1):
            last = pub.publish(filled(model, k))
        if not agent.wait_for(last, 300):
            failures.append(f"{staging}: v{last} not applied within 300 s")
        passes, mixed = readers.passes, readers.mixed
    final = pub.store.manifest(last).by_name()
    for name, t in model.state_dict().items():
        if codec.digest(codec.as_bytes(t)) != final[name].digest:
            failures.append(f"{staging}: {name} is not bit-equal to v{last}")
    if {k: v.data_ptr() for k, v in model.state_dict().items()} != pointers:
        failures.append(f"{staging}: a data_ptr() changed")
    if any(a is not b for a, b in zip(model.parameters(), params, strict=True)):
        failures.append(f"{staging}: a Parameter was replaced")
    if mixed:
        failures.append(f"{staging}: {mixed} of {passes} reader passes saw two versions")
    if staging == "device" or device.type != "cuda":
        sources = {k: v.to(device) for k, v in filled(model, 0).items()}
    else:
        sources = {k: v.pin_memory() for k, v in filled(model, 0).items()}
    copies = [bare_copy(model, sources, device) for _ in range(3)]
    pub.store.delete_all()
    pub.close()
    nbytes = sum(v.nbytes for v in model.state_dict().values())
    figures = {
        "applies": float(len(reports)),
        "reader passes": float(passes),
        "MiB": nbytes / MiB,
        "fetch ms": statistics.median(r.fetch_seconds for r in reports) * 1000,
        "validate ms": statistics.median(r.validate_seconds for r in reports) * 1000,
        "writer lock ms": statistics.median(r.apply_seconds for r in reports) * 1000,
        "bare copy_ ms": statistics.median(copies) * 1000,
    }
    return failures, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument(
        "--device", default="cuda", help="cpu runs the same checks without a GPU (a dry run)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA, skipped")
        return 0
    if device.type != "cuda":
        torch.set_num_threads(1)  # a loaded CPU makes a thread pool's timings noise
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}, torch {torch.__version__}\n")
    failures: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    with EmbeddedRedis() as server:
        settings = HotswapSettings(
            redis_url=server.url,
            chunk_bytes=4 * MiB,
            poll_interval=1.0,
            _env_file=None,  # type: ignore[call-arg]
        )
        modes: tuple[Staging, ...] = ("pinned", "device")
        for mode in modes:
            found, rows[mode] = check_mode(mode, settings, args.mib, args.versions, device)
            failures += found
    keys = list(rows["pinned"])
    print("| staging | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, figures in rows.items():
        print(f"| {label} | " + " | ".join(f"{figures[k]:.1f}" for k in keys) + " |")
    for label, figures in rows.items():
        ratio = figures["writer lock ms"] / figures["bare copy_ ms"]
        print(f"\n{label}: writer lock / bare copy_ = {ratio:.2f}x")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    print("\nall checks passed: data_ptr unchanged, bit-exact, no mixed reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
