"""Digest throughput on this machine: ``python -m bench.hash_speed [--mb 256] [--repeat 3]``.

Prints GB/s (10^9 bytes a second, best of ``--repeat``) for the candidates
behind the choice of BLAKE3 in ``hotswap.codec.digest``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import time
from collections.abc import Callable

import blake3
import torch

from hotswap import codec

Digest = Callable[[memoryview], object]


def candidates() -> dict[str, Digest]:
    found: dict[str, Digest] = {
        "blake3, 1 thread": lambda b: blake3.blake3(b, max_threads=1).digest(),
        "blake3, 2 threads": lambda b: blake3.blake3(b, max_threads=2).digest(),
        "blake3, AUTO threads": lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(),
        "hotswap.codec.digest": codec.digest,
        "hashlib sha256": lambda b: hashlib.sha256(b).digest(),
        "hashlib blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    try:  # not a dependency: measured only where someone installed it
        xxhash = importlib.import_module("xxhash")
        found["xxh3_128 (not cryptographic)"] = lambda b: xxhash.xxh3_128(b).digest()
    except ImportError:
        pass
    return found


def measure(fns: dict[str, Digest], data: memoryview, repeat: int) -> dict[str, float]:
    """Best throughput in GB/s of each candidate over ``repeat`` rounds.

    Rounds interleave the candidates so that load from other processes on a
    shared machine hits them all alike.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn(data)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(data) / seconds / 1e9 for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=256, help="buffer size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per candidate")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    data = codec.as_bytes(
        torch.randint(0, 256, (args.mb * 1024 * 1024,), dtype=torch.uint8, generator=g)
    )
    print(f"{args.mb} MiB, best of {args.repeat}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'digest':32} {'GB/s':>7}")
    for name, speed in measure(candidates(), data, args.repeat).items():
        print(f"{name:32} {speed:7.2f}")


if __name__ == "__main__":
    main()
