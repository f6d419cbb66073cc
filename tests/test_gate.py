"""The readers-writer gate: concurrent readers, writers first, re-entrant readers,
readers owned by asyncio tasks. Pure."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hotswap.errors import ConfigError
from hotswap.gate import Gate

# A bounded wait for things that must NOT happen (a reader getting in under a
# writer): an event that stays unset this long counts as "did not happen".
NEGATIVE_WAIT = 0.05


def test_readers_share_the_gate() -> None:
    gate = Gate()
    inside = threading.Barrier(2, timeout=5)

    def reader() -> None:
        with gate.reading():
            inside.wait()  # both readers are inside at once, or this times out

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not inside.broken


def test_writer_gets_in_while_four_readers_keep_reacquiring() -> None:
    gate = Gate()
    stop = threading.Event()
    reads = [0] * 4
    all_reading = threading.Barrier(5, timeout=5)

    def reader(i: int) -> None:
        first = True
        while not stop.is_set():
            with gate.reading():
                reads[i] += 1
            if first:
                first = False
                all_reading.wait()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        all_reading.wait()  # every reader has read at least once
        for _ in range(5):
            with gate.writing():
                before = sum(reads)
                got_in = threading.Event()
                probe = threading.Thread(target=lambda: _read_then_set(gate, got_in))
                probe.start()
                assert not got_in.wait(NEGATIVE_WAIT)  # no reader runs while the writer holds it
                assert sum(reads) == before
            probe.join(5)
            assert got_in.is_set()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(reads)


def _read_then_set(gate: Gate, event: threading.Event) -> None:
    with gate.reading():
        event.set()


def test_nested_reading_does_not_queue_behind_a_waiting_writer() -> None:
    gate = Gate()
    wrote = threading.Event()

    def writer() -> None:
        with gate.writing():
            wrote.set()

    with gate.reading():
        assert gate.reading_here()
        t = threading.Thread(target=writer)
        t.start()
        assert _queued(gate)  # the writer now waits for us, and holds new readers back
        with gate.reading():  # would deadlock if it queued behind the writer
            assert not wrote.is_set()
        assert gate.reading_here()
    t.join(5)
    assert wrote.is_set() and not gate.reading_here()


def _queued(gate: Gate, attempts: int = 5000) -> bool:
    """Wait until a writer has queued (readerwriterlock's RWLockWrite: the first queued
    writer counts itself, then takes the readers' entry lock)."""
    rw = gate._rw
    idle = threading.Event()
    for _ in range(attempts):
        if rw.v_write_count == 1 and rw.c_lock_read_try.locked():
            return True
        idle.wait(0.001)
    return False


# -- asyncio: one thread, many tasks ------------------------------------------------


def test_sync_reading_by_a_second_task_across_an_await_is_refused() -> None:
    """The defect: a second handler's reading() counted as nested, and the first one's
    exit released the lock while the second still read."""
    gate = Gate()
    wrote = threading.Event()

    async def main() -> None:
        first_holds = asyncio.Event()
        first_may_exit = asyncio.Event()

        async def first() -> None:
            with gate.reading():
                first_holds.set()
                await first_may_exit.wait()

        async def second() -> None:
            await first_holds.wait()
            with pytest.raises(ConfigError, match=r"reading_async\(\)"), gate.reading():
                pass  # pragma: no cover - refused before the body

        holder = asyncio.create_task(first())
        await second()
        # The refusal changed nothing: the first task still holds the gate, so
        # a writer waits until it leaves.
        writer = threading.Thread(target=lambda: _write_then_set(gate, wrote))
        writer.start()
        assert _queued(gate)
        assert not wrote.is_set()
        first_may_exit.set()
        await holder
        await asyncio.to_thread(writer.join, 5)

    asyncio.run(main())
    assert wrote.is_set()
    assert not gate.reading_here() and not gate.held_in_thread()


def _write_then_set(gate: Gate, event: threading.Event) -> None:
    with gate.writing():
        event.set()


def test_overlapping_async_readers_never_see_two_versions() -> None:
    """Handlers hold reading_async() across awaits while a writer thread keeps
    changing a pair of values: every read sees both halves of one version."""
    gate = Gate()
    weights = [0, 0]
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            with gate.writing():
                weights[0] += 1
                weights[1] = weights[0]
                writes += 1

    async def handler(reads: list[tuple[int, int]]) -> None:
        # At least 200 reads each, and on until reads saw the writer get in
        # between them 3 times (bounded: the writer thread competes for the GIL).
        for attempt in range(200_000):
            if attempt >= 200 and len({a for a, _ in reads}) >= 3:
                break
            async with gate.reading_async():
                first = weights[0]
                await asyncio.sleep(0)  # other handlers run here, the writer waits
                reads.append((first, weights[1]))

    async def main() -> list[tuple[int, int]]:
        reads: list[tuple[int, int]] = []
        await asyncio.gather(*(handler(reads) for _ in range(8)))
        return reads

    t = threading.Thread(target=writer)
    t.start()
    try:
        reads = asyncio.run(main())
    finally:
        stop.set()
        t.join(5)
    assert len(reads) >= 8 * 200
    assert all(a == b for a, b in reads), [r for r in reads if r[0] != r[1]][:5]
    assert writes > 0 and len({a for a, _ in reads}) >= 3  # the writer got in between reads


def test_async_reader_waits_for_a_writer_without_blocking_the_loop() -> None:
    gate = Gate()
    writer_in, writer_may_leave = threading.Event(), threading.Event()

    def writer() -> None:
        with gate.writing():
            writer_in.set()
            writer_may_leave.wait(5)

    async def main() -> list[str]:
        order: list[str] = []

        async def reader() -> None:
            async with gate.reading_async():
                order.append("read")

        async def other() -> None:
            order.append("loop ran")  # runs while the reader waits: the loop is free
            writer_may_leave.set()

        await asyncio.gather(reader(), other())
        return order

    t = threading.Thread(target=writer)
    t.start()
    assert writer_in.wait(5)
    order = asyncio.run(main())
    t.join(5)
    assert order == ["loop ran", "read"]


def test_nested_async_reading_does_not_queue_behind_a_waiting_writer() -> None:
    gate = Gate()
    wrote = threading.Event()

    async def main() -> None:
        async with gate.reading_async():
            t = threading.Thread(target=lambda: _write_then_set(gate, wrote))
            t.start()
            assert await asyncio.to_thread(_queued, gate)
            async with gate.reading_async():  # would deadlock if it queued
                with gate.reading():  # sync nesting in the same task is nesting too
                    assert gate.reading_here()
            assert not wrote.is_set()
        await asyncio.to_thread(t.join, 5)

    asyncio.run(main())
    assert wrote.is_set()


def test_cancelled_async_reader_does_not_leak_the_lock() -> None:
    gate = Gate()
    writer_in, writer_may_leave = threading.Event(), threading.Event()

    def writer() -> None:
        with gate.writing():
            writer_in.set()
            writer_may_leave.wait(5)

    async def main() -> None:
        task = asyncio.create_task(_read(gate))
        await asyncio.sleep(0)  # the task starts waiting for the lock
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer_may_leave.set()

    t = threading.Thread(target=writer)
    t.start()
    assert writer_in.wait(5)
    asyncio.run(main())
    t.join(5)
    # The worker thread got the read lock after the cancel and gave it back:
    # a writer gets in (it would wait forever on a leaked reader).
    second = threading.Event()
    w = threading.Thread(target=lambda: _write_then_set(gate, second))
    w.start()
    w.join(5)
    assert second.is_set()


async def _read(gate: Gate) -> None:
    async with gate.reading_async():
        pass  # pragma: no cover - cancelled while waiting
