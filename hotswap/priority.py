"""The agent is a guest in a serving process: its CPU work runs below the serving threads.

The agent's own thread lowers itself at start (``lower``): a nice value on
Linux, where it is per thread (``setpriority`` of the thread's id), and the
threads its torch operations (this thread's OpenMP count), BLAKE3 and frame
decoding may use. Every thread it starts
afterwards (frame workers, hashing, probation timers) inherits the nice
value, so the fetch, hashing, decoding, validation and staging copies all
run below the threads that serve. An unprivileged thread cannot raise its
priority back, so what holds the writer lock never runs there: readers wait
on it, and a thread the scheduler puts last would stretch their wait.
``Foreground`` is a thread at the priority of whoever started the agent
that runs those writes (``run``) for a lowered thread.

Elsewhere than Linux nothing is lowered (a process-wide nice would slow the
serving threads too), and ``run`` calls in place.

Example::

    fg = Foreground("hotswap-writer-m").start()   # on the thread that starts the agent
    # ... then on the agent's own thread:
    lower(nice=10, threads=1)
    fg.run(lambda: copy_under_the_writer_lock())
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import blake3

log = logging.getLogger("hotswap.agent")
T = TypeVar("T")

_local = threading.local()


def lowered() -> bool:
    """Whether this thread lowered itself (or was started by one that had)."""
    return bool(getattr(_local, "lowered", False)) or _inherited()


def _inherited() -> bool:
    """A thread started by a lowered thread has its nice value (Linux copies it)."""
    if sys.platform != "linux":
        return False
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) > _process_nice
    except OSError:
        return False


_process_nice = os.getpriority(os.PRIO_PROCESS, 0) if sys.platform == "linux" else 0


def budget() -> int | None:
    """The threads this thread's CPU work may use (``lower``'s ``threads``; None: any)."""
    value: int | None = getattr(_local, "threads", None)
    return value


def hash_threads() -> int:
    """``max_threads`` for BLAKE3 on this thread: its budget, else every core."""
    value = budget()
    return blake3.blake3.AUTO if value is None else max(1, value)


def lower(nice: int, threads: int | None) -> bool:
    """Lower this thread: ``nice`` added to the process's own (0: unchanged), and at
    most ``threads`` threads for its torch, BLAKE3 and frame work (None: unchanged).

    Returns:
        Whether the nice value was lowered (False elsewhere than Linux, for 0,
        or where the system refused).
    """
    if threads is not None:
        # BLAKE3 and the frame workers read ``budget``; torch's OpenMP count is set for
        # this thread only (``torch.set_num_threads`` would also set MKL's for the
        # whole process: the serving threads' matmuls, and their float sums, would
        # change with it).
        _local.threads = max(1, threads)
        _omp_threads(max(1, threads))
    if nice <= 0 or sys.platform != "linux":
        return False
    tid = threading.get_native_id()
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as e:
        log.info("could not lower the agent thread's priority (%s); it runs as is", e)
        return False
    _local.lowered = True
    return True


def _omp_threads(count: int) -> bool:
    """Set this thread's OpenMP thread count in the runtime torch loaded (an OpenMP
    count is per thread); False where torch runs on another backend."""
    setter = _omp_setter()
    if setter is None:
        return False
    setter(count)
    return True


@functools.cache
def _omp_setter() -> Any:
    """``omp_set_num_threads`` of the libgomp torch loaded, or None."""
    if sys.platform != "linux":
        return None
    import torch  # loads its OpenMP runtime; only the agent's thread gets here

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        with contextlib.suppress(OSError, AttributeError):
            return ctypes.CDLL(path).omp_set_num_threads
    return None


class Foreground:
    """One thread at its starter's priority that runs work for lowered threads.

    ``start()`` must be called on the thread whose priority it should have
    (the one that starts the agent): its thread is made there, at once.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> Foreground:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
            # The executor makes its thread on the first submit, here: at this
            # thread's priority, not at the lowered one of a later caller.
            self._pool.submit(lambda: None).result()
        return self

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the foreground thread if this thread is lowered, else here."""
        pool = self._pool
        if pool is None or not lowered():
            return fn()
        return pool.submit(fn).result()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
