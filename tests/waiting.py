"""Waiting in tests without a clock: poll a condition a bounded number of times.

For conditions that no event in this process announces (another process's
state, a cache in a server expiring). Where an event exists (``Agent.wait_for``,
a ``threading.Event``), wait for it instead. The pause only spaces the
attempts out: nothing here measures or asserts how long anything took.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PAUSE = 0.02


def poll(check: Callable[[], bool], attempts: int = 500, pause: float = PAUSE) -> bool:
    """True as soon as ``check()`` is true, False after ``attempts`` tries that were not."""
    for attempt in range(attempts):
        if check():
            return True
        if attempt + 1 < attempts:
            time.sleep(pause)
    return False
