"""Peak resident memory over a baseline (torch allocations bypass tracemalloc, so
RSS is what tells).

Linux keeps each process's peak RSS itself (``VmHWM``) and resets it on a
write of ``5`` to ``/proc/self/clear_refs``: reading that needs no thread,
so nothing competes with the measured code for the GIL or a core, and no
peak shorter than a sampling interval is missed. Where that is not
available a thread samples RSS every 2 ms.
"""

from __future__ import annotations

import os
import threading

PAGE = os.sysconf("SC_PAGE_SIZE")
INTERVAL = 0.002


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def _high_water_mark() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _high_water_mark()
    except OSError:
        return False
    return True


class PeakRss:
    """``start()`` takes the baseline; ``stop()`` returns the peak RSS above it."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False
        self.base = 0
        self.peak = 0

    def start(self) -> PeakRss:
        self.stop()
        self._stop.clear()
        self._kernel = _reset_high_water_mark()
        self.base = self.peak = rss()
        if not self._kernel:
            self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        if self._kernel:
            self.peak = max(self.peak, _high_water_mark())
            self._kernel = False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak = max(self.peak, rss())
        return max(0, self.peak - self.base)
