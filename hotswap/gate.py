"""The lock between serving code and updates: many readers, one writer, writers first.

Built on ``readerwriterlock.RWLockWrite`` (writer preference: once an update
waits, new readers queue behind it, so a steady stream of forward passes
cannot starve it). A reader is re-entrant within its *owner*: the asyncio
task it runs in, or else its thread. A nested read does not queue behind a
waiting writer, which would deadlock.

Why the owner is the task and not the thread: the tasks of an event loop
share one thread. Counting them as one reader let a second handler's
``reading()`` pass as "nested" while the first held the lock across an
``await``; the first one's exit then released the lock under the second
(Guarantee 1 broken). So the sync ``reading()`` refuses to start while another
owner on the same thread holds the gate (blocking the loop's thread there
could deadlock it against a waiting writer), and asyncio code uses
``reading_async()``, which awaits the lock without blocking the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

from readerwriterlock import rwlock

from hotswap.errors import ConfigError

# Owner of a read: the running asyncio task, or None for plain thread code.
_Owner: TypeAlias = "asyncio.Task[Any] | None"


def _owner() -> _Owner:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop runs in this thread
        return None


class Gate:
    """A writer-preferring readers-writer lock with re-entrant readers.

    Example:
        >>> gate = Gate()
        >>> with gate.reading():
        ...     pass  # a forward pass; no writer runs meanwhile
    """

    def __init__(self) -> None:
        self._rw = rwlock.RWLockWrite()
        # Per thread: each owner holding the reader side there, and its depth.
        self._local = threading.local()

    def _holders(self) -> dict[_Owner, int]:
        holders: dict[_Owner, int] | None = getattr(self._local, "holders", None)
        if holders is None:
            holders = self._local.holders = {}
        return holders

    def reading_here(self) -> bool:
        """Whether the calling task (or thread, outside asyncio) holds the reader side."""
        return bool(self._holders().get(_owner()))

    def held_in_thread(self) -> bool:
        """Whether any reader on the calling thread (this task or another on its
        event loop) holds the reader side: a blocking writer here would deadlock."""
        return bool(self._holders())

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the reader side (blocking). For threads; in asyncio use ``reading_async``.

        Raises:
            ConfigError: another asyncio task on this thread holds the gate
                (across an ``await``): blocking here could deadlock the loop.
        """
        owner, holders = _owner(), self._holders()
        depth = holders.get(owner, 0)
        if depth:
            with self._nested(holders, owner, depth):
                yield
            return
        if holders:
            raise ConfigError(
                "reading() was entered while another asyncio task on this thread holds "
                "the model across an await; in async code use `async with "
                "agent.reading_async()`"
            )
        lock = self._rw.gen_rlock()
        lock.acquire()
        with self._held(holders, owner, lock):
            yield

    @contextlib.asynccontextmanager
    async def reading_async(self) -> AsyncIterator[None]:
        """Hold the reader side from asyncio code, awaiting it without blocking the loop."""
        owner, holders = _owner(), self._holders()
        depth = holders.get(owner, 0)
        if depth:
            with self._nested(holders, owner, depth):
                yield
            return
        lock = self._rw.gen_rlock()
        if not lock.acquire(blocking=False):
            await _acquire_in_thread(lock)
        with self._held(holders, owner, lock):
            yield

    @staticmethod
    @contextlib.contextmanager
    def _nested(holders: dict[_Owner, int], owner: _Owner, depth: int) -> Iterator[None]:
        holders[owner] = depth + 1
        try:
            yield
        finally:
            holders[owner] = depth

    @staticmethod
    @contextlib.contextmanager
    def _held(holders: dict[_Owner, int], owner: _Owner, lock: rwlock.Lockable) -> Iterator[None]:
        holders[owner] = 1
        try:
            yield
        finally:
            del holders[owner]
            lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        lock = self._rw.gen_wlock()
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


async def _acquire_in_thread(lock: rwlock.Lockable) -> None:
    """Wait for ``lock`` in a worker thread; if the waiting task is cancelled,
    the lock is released as soon as that thread gets it, so it never leaks."""
    loop = asyncio.get_running_loop()
    waiting = loop.run_in_executor(None, lock.acquire)
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:

        def release_once_taken(taken: asyncio.Future[bool]) -> None:
            if not taken.cancelled() and taken.exception() is None:
                lock.release()

        waiting.add_done_callback(release_once_taken)
        raise
