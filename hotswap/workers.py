"""A small shared pool of threads for frame work: delta frames encoded and decoded on
every core. Imports no Redis.

zstd, numpy's loops and BLAKE3 release the GIL while they run, so frames
of one tensor encoded or decoded in these threads use the host's cores
side by side; the calling thread meanwhile reads, hashes or uploads.
``ordered`` keeps results in submission order and never more than a window
of them in flight, so memory stays at a few frames and a caller can stop
early (a delta past its size limit).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from hotswap import priority

T = TypeVar("T")

# Frame work a core can take; more threads than cores only add switching.
MAX_WORKERS = 4

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_owner = os.getpid()  # the process whose threads _pool runs


def _forget_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own.

    (The parent's executor object would still count its threads as running
    and never start any, so the child's first frame job would wait forever.)
    """
    global _pool, _lock, _owner
    _pool, _lock, _owner = None, threading.Lock(), os.getpid()


os.register_at_fork(after_in_child=_forget_after_fork)


@functools.cache
def threads() -> int:
    """How many threads the pool runs: the host's cores, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    """The process's frame pool, started on first use."""
    global _pool, _owner  # noqa: PLW0603 - one pool a process, made on first use
    with _lock:
        # The pid check backs up the fork hook for a child forked by other means.
        if _pool is None or _owner != os.getpid():
            _pool = ThreadPoolExecutor(threads(), thread_name_prefix="hotswap-frames")
            _owner = os.getpid()
        return _pool


def ordered(
    jobs: Iterable[Callable[[], T]], window: int | None = None, *, parallel: bool = True
) -> Generator[T, None, None]:
    """Run ``jobs`` in the pool, yielding their results in order.

    At most ``window`` (default twice the pool's threads) run or wait at a
    time; ``parallel`` False (or a one-core host) runs them here, in turn. A
    job's exception is raised at its turn. Whenever the caller stops (an
    exception, or it closes the generator), jobs not started are cancelled
    and running ones are waited for, so none still writes into memory the
    caller reuses.

    Example::

        frames = list(workers.ordered(functools.partial(encode_frame, n, b) for n, b in chunks))
    """
    allowed = priority.budget()  # an agent's thread may be held to fewer (HOTSWAP_AGENT_THREADS)
    width = threads() if allowed is None else min(threads(), allowed)
    window = min(window or 2 * width, 2 * width)
    if not parallel or width == 1:  # nothing to overlap: no thread hops
        for job in jobs:
            yield job()
        return
    running: deque[Future[T]] = deque()
    submit = pool().submit
    try:
        for job in jobs:
            running.append(submit(job))
            if len(running) >= window:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for future in running:
            future.cancel()
        for future in running:
            if not future.cancelled():
                future.exception()  # waits; the caller already has its own error
