"""What each step of an update costs alone, over the same state dict: the
figures that explain the gap between hotswap and the raw ceiling."""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hotswap import codec
from hotswap import manifest as mf

# A step slower than this is timed once more, not ``reps`` times: the whole
# benchmark has to stay within minutes.
SLOW = 1.0


def _time(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    fn()  # warm-up
    if time.perf_counter() - start > SLOW:
        reps = 1
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(sd: dict[str, torch.Tensor], manifest_bytes: bytes, reps: int = 3) -> dict[str, Any]:
    """Seconds per pass over every tensor of ``sd`` (medians of ``reps``)."""
    tensors = list(sd.values())
    dst = [t.clone() for t in tensors]

    def each(fn: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for t in tensors:
                fn(t)

        return run

    def fresh_fill() -> None:
        # Pages straight from the kernel (an anonymous mapping), as a staging
        # buffer gets them when the allocator has returned freed memory.
        for t in tensors:
            if not t.nbytes:
                continue
            area = mmap.mmap(-1, t.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            view = torch.frombuffer(area, dtype=torch.uint8)
            view.fill_(1)
            del view
            area.close()

    def copy() -> None:
        with torch.no_grad():
            for d, t in zip(dst, tensors, strict=True):
                d.copy_(t)

    return {
        "norm, float64 through one reused block (codec.norm)": _time(each(codec.norm), reps),
        "max-abs, aminmax in the tensor's dtype": _time(each(torch.aminmax), reps),
        "blake3 digest (codec.digest)": _time(
            each(lambda t: codec.digest(codec.as_bytes(t))), reps
        ),
        "norm + max-abs (codec.stats)": _time(each(codec.stats), reps),
        "finite check (torch.isfinite.all)": _time(each(lambda t: torch.isfinite(t).all()), reps),
        "fresh pages from the kernel, first touch": _time(fresh_fill, reps),
        "copy_ into touched tensors": _time(copy, reps),
        "manifest decode": _time(lambda: mf.decode(manifest_bytes), reps * 10),
    }
