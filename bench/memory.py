"""Peak resident memory over a baseline, sampled in a thread (torch allocations
bypass tracemalloc, so RSS is what tells)."""

from __future__ import annotations

import os
import threading

PAGE = os.sysconf("SC_PAGE_SIZE")
INTERVAL = 0.002


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """``start()`` takes the baseline; ``stop()`` returns the peak RSS above it."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base = 0
        self.peak = 0

    def start(self) -> PeakRss:
        self.stop()
        self._stop.clear()
        self.base = self.peak = rss()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak = max(self.peak, rss())
        return max(0, self.peak - self.base)
