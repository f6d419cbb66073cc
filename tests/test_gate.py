"""The readers-writer gate: concurrent readers, writers first, re-entrant readers. Pure."""

from __future__ import annotations

import threading
import time

from hotswap.gate import Gate


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

    def reader(i: int) -> None:
        while not stop.is_set():
            with gate.reading():
                time.sleep(0.002)
                reads[i] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)
        waits = []
        for _ in range(5):
            start = time.perf_counter()
            with gate.writing():
                waits.append(time.perf_counter() - start)
                before = sum(reads)
                time.sleep(0.01)
                assert sum(reads) == before  # no reader runs while the writer holds it
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert max(waits) < 1.0 and all(reads)


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


def _queued(gate: Gate, timeout: float = 5.0) -> bool:
    """Wait until a writer has queued (readerwriterlock's RWLockWrite: the first queued
    writer counts itself, then takes the readers' entry lock)."""
    deadline = time.monotonic() + timeout
    rw = gate._rw
    while time.monotonic() < deadline:
        if rw.v_write_count == 1 and rw.c_lock_read_try.locked():
            return True
        time.sleep(0.001)
    return False
