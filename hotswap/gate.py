"""The lock between serving code and updates: many readers, one writer, writers first.

Built on ``readerwriterlock.RWLockWrite`` (writer preference: once an update
waits, new readers queue behind it, so a steady stream of forward passes
cannot starve it). The reader side is re-entrant within a thread: a nested
``reading()`` does not queue behind a waiting writer, which would deadlock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from readerwriterlock import rwlock


class Gate:
    """A writer-preferring readers-writer lock with re-entrant readers."""

    def __init__(self) -> None:
        self._rw = rwlock.RWLockWrite()
        self._local = threading.local()

    def reading_here(self) -> bool:
        """Whether the calling thread holds the reader side."""
        return bool(getattr(self._local, "depth", 0))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        lock = self._rw.gen_rlock()
        lock.acquire()
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        lock = self._rw.gen_wlock()
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
