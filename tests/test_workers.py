"""The frame pool (hotswap.workers): results in order, errors at their turn, none left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from hotswap import workers


def job(i: int, log: list[int], gate: threading.Event | None = None) -> Callable[[], int]:
    def run() -> int:
        if gate is not None:
            gate.wait(10)
        log.append(i)
        return i * i

    return run


@pytest.mark.parametrize("parallel", [True, False])
def test_results_come_in_submission_order(parallel: bool) -> None:
    log: list[int] = []
    got = list(workers.ordered((job(i, log) for i in range(50)), parallel=parallel))
    assert got == [i * i for i in range(50)] and sorted(log) == list(range(50))


def test_an_error_is_raised_at_its_turn_and_later_jobs_are_not_started_past_the_window() -> None:
    log: list[int] = []

    def boom() -> int:
        raise ValueError("job 3 failed")

    jobs = [job(i, log) for i in range(3)] + [boom] + [job(i, log) for i in range(4, 100)]
    got: list[int] = []
    with pytest.raises(ValueError, match="job 3 failed"):
        for r in workers.ordered(jobs, window=4):
            got.append(r)
    assert got == [0, 1, 4]
    assert max(log) < 3 + 4 + 1  # at most a window past the failed job ever ran


def test_a_caller_that_stops_early_waits_for_running_jobs() -> None:
    log: list[int] = []
    started, gate = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        gate.wait(10)
        log.append(1)
        return 1

    results = workers.ordered([job(0, log), slow, job(2, log)], window=3)
    assert next(results) == 0
    opener = threading.Thread(target=lambda: started.wait(10) and gate.set())
    opener.start()
    results.close()  # returns only once the running job is done
    assert 1 in log
    opener.join(10)


FORKED = """
import os, sys, threading
from hotswap import workers

# Every thread of the parent's pool started: each job waits for all the others.
n = workers.threads()
barrier = threading.Barrier(n)
assert list(workers.ordered([lambda: barrier.wait(10) >= 0] * n, window=n)) == [True] * n
pid = os.fork()
if pid == 0:  # the child: run jobs in the pool, say what came back
    got = list(workers.ordered([lambda: 3, lambda: 4, lambda: 5]))
    os.write(1, b"child ok" if got == [3, 4, 5] else b"child bad")
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    """After a fork the parent's pool threads do not exist in the child; frame jobs there
    still run (a serving framework may fork workers after an agent decoded deltas).

    Run in an interpreter of its own, so that no test runner's threads or signal
    handlers are in the fork, and killed whole if the child hangs.
    """
    with subprocess.Popen(
        [sys.executable, "-c", FORKED], stdout=subprocess.PIPE, start_new_session=True
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the parent and its hung child
            proc.communicate()
            pytest.fail("a forked child's frame jobs never ran")
    assert proc.returncode == 0
    assert out == b"child ok"
