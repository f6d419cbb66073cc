"""Waiting for a condition by counting attempts, not by reading a clock."""

from __future__ import annotations

import threading
from collections.abc import Callable


def until(done: Callable[[], bool], attempts: int, pause: float = 0.01) -> bool:
    """Ask ``done()`` up to ``attempts`` times with ``pause`` seconds between; whether it held.

    A busy machine makes the wait longer, never the answer different: there is
    no deadline to miss, only a bound on how often to ask.
    """
    idle = threading.Event()  # never set: its wait is the pause between attempts
    for _ in range(attempts):
        if done():
            return True
        idle.wait(pause)
    return done()
