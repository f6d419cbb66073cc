"""How long an update holds the writer lock, against a bare ``copy_`` of the same bytes.

    python -m bench.apply_pause [--mib 256] [--repeats 5] [--redis-url URL]

A model of ``--mib`` MiB of float32 parameters takes alternate versions A and
B (every tensor changes each time) through a real Publisher, Redis and Agent.
For each apply the agent reports the seconds it held the writer lock; a reader
thread measures the longest it waited to enter ``reading()``. In the same run,
the same live tensors are overwritten with a bare ``copy_`` from tensors of
the same sizes. The pause is the agent's cost to serving; the copy is the floor.
Without ``--redis-url`` a throwaway redis-server is started.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import torch

from hotswap import Agent, ApplyReport, HotswapSettings
from hotswap.embedded import EmbeddedRedis
from publisher import Publisher

MiB = 1024 * 1024
TARGET = 1.3


class Blocks(torch.nn.Module):
    """``count`` float32 matrices of ``rows`` x 1024 (4 KiB rows)."""

    def __init__(self, total_bytes: int, count: int) -> None:
        super().__init__()
        rows = max(1, total_bytes // count // 4096)
        self.blocks = torch.nn.ParameterList(
            torch.nn.Parameter(torch.full((rows, 1024), 1.0)) for _ in range(count)
        )


def state(model: Blocks, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with EmbeddedRedis() as server:
        yield server.url


class ReaderProbe:
    """A reader that keeps entering ``reading()`` and records its longest wait."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            with self.agent.reading():
                waited = time.perf_counter() - start
            self.longest = max(self.longest, waited)
            time.sleep(0.0005)

    def __enter__(self) -> ReaderProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bare_copy(model: Blocks, sources: dict[str, torch.Tensor]) -> float:
    live = model.state_dict(keep_vars=True)
    start = time.perf_counter()
    with torch.no_grad():
        for name, src in sources.items():
            live[name].copy_(src)
    return time.perf_counter() - start


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} (min {min(values) * 1000:.1f})"


def run(mib: int, repeats: int, count: int, url: str | None) -> int:
    torch.set_num_threads(1)  # copy_ on one thread on both sides: like for like
    model = Blocks(mib * MiB, count)
    total = sum(p.nbytes for p in model.parameters())
    versions = [state(model, 2.0), state(model, 3.0)]
    pauses: list[float] = []
    copies: list[float] = []
    reports: list[ApplyReport] = []
    with redis_url(url) as address:
        settings = HotswapSettings(
            redis_url=address,
            chunk_bytes=4 * MiB,
            poll_interval=1.0,
            _env_file=None,  # type: ignore[call-arg]
        )
        pub = Publisher("bench-apply-pause", settings=settings)
        pub.store.delete_all()
        agent = Agent(
            model,
            "bench-apply-pause",
            settings=settings,
            on_applied=lambda v, r: reports.append(r),
        )
        with agent, ReaderProbe(agent) as probe:
            for i in range(repeats):
                v = pub.publish(versions[i % 2])
                if not agent.wait_for(v, 300):
                    print(f"agent did not apply v{v} within 300 s", file=sys.stderr)
                    return 1
                pauses.append(reports[-1].apply_seconds)
                # The floor, in the same run: the same bytes into the same tensors.
                copies.append(bare_copy(model, versions[(i + 1) % 2]))
                copies.append(bare_copy(model, versions[i % 2]))  # back to what runs
            longest_wait = probe.longest
        fetch = statistics.median(r.fetch_seconds for r in reports)
        check = statistics.median(r.validate_seconds for r in reports)
        pub.store.delete_all()
        pub.close()
    ratio = statistics.median(pauses) / statistics.median(copies)
    print(f"## Apply pause, {total / MiB:.0f} MiB in {count} float32 tensors, {repeats} updates\n")
    print("| measure | ms, median (min) |")
    print("|---|---|")
    print(f"| writer lock held by the agent's apply | {ms(pauses)} |")
    print(f"| bare `copy_` of the same bytes | {ms(copies)} |")
    print(f"| longest wait of a reader to enter `reading()` | {longest_wait * 1000:.1f} |")
    print(f"| fetch (outside the lock) | {fetch * 1000:.1f} |")
    print(f"| validate (outside the lock) | {check * 1000:.1f} |")
    verdict = "within" if ratio <= TARGET else "OVER"
    print(f"\napply pause / bare copy_ = **{ratio:.2f}x** ({verdict} the {TARGET}x target)")
    return 0 if ratio <= TARGET else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256, help="update size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--redis-url", default=None, help="default: a throwaway redis-server")
    args = parser.parse_args(argv)
    return run(args.mib, args.repeats, args.tensors, args.redis_url)


if __name__ == "__main__":
    sys.exit(main())
