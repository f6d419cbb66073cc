"""An agent's health numbers: the user's callback, called on a thread of its own.

``Agent(health=...)`` gives a callback that returns numbers by name (error
rate, latency, any scalar); ``HealthWatch`` calls it at start and every
``interval`` seconds and hands what ``clean`` keeps to the reporter, which
puts it into the status record where ``hotswap rollout`` judges canaries.
The calls run on their own daemon thread, one at a time: a callback that is
slow, or never returns, delays only its own next numbers (the record's
``health_at`` ages), never the heartbeat. Imports no Redis.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping

from hotswap.status import MAX_HEALTH, MAX_HEALTH_NAME, health_entry

Health = Callable[[], Mapping[str, float]]
"""``() -> {name: number}``: an agent's health (error rate, latency, any scalar).

It must be quick (it runs every ``health_interval`` seconds, one call at a
time) and must not wait on the model's writer lock. Kept: at most
``MAX_HEALTH`` numbers (the first by name), named as keys are (1-64 characters
from A-Z a-z 0-9 . _ -), finite ints or floats. Anything else is dropped and
logged once; a raise, or a return that is not a mapping, is logged once per
distinct error and leaves the record's ``health`` None until a call succeeds.

Example::

    Agent(model, "m", health=lambda: {"error_rate": errors.rate(), "p99_ms": p99()})
"""

# Distinct problems logged (each once): a callback whose error text changes at
# every call must not grow the set of those already said without bound.
MAX_PROBLEMS = 64
# Kept of a raised error's text in the log and as the key it is logged once by.
MAX_ERROR = 200

Problem = tuple[str, str]
"""(what kind of problem, to log each kind once; the line to log)."""


def clean(raw: object) -> tuple[dict[str, float] | None, list[Problem]]:
    """The numbers kept from what a health callback returned, and what was dropped.

    None (and a problem) when ``raw`` is not a mapping.

    Example:
        >>> clean({"p99_ms": 12, "bad name": 1.0, "nan": float("nan")})[0]
        {'p99_ms': 12.0}
        >>> clean([1.0])
        (None, [('type', 'health callback returned list, not a mapping of names to numbers')])
    """
    if not isinstance(raw, Mapping):
        why = f"health callback returned {type(raw).__name__}, not a mapping of names to numbers"
        return None, [("type", why)]
    kept: dict[str, float] = {}
    dropped: dict[str, list[str]] = {}
    for name, value in raw.items():
        kind = _fault(name, value)
        if kind is None:
            kept[name] = float(value)
        else:
            dropped.setdefault(kind, []).append(repr(name)[:80])
    names = sorted(kept)
    if len(names) > MAX_HEALTH:
        dropped["many"] = names[MAX_HEALTH:]
        kept = {n: kept[n] for n in names[:MAX_HEALTH]}
    return kept, [(kind, _said(kind, which)) for kind, which in dropped.items()]


def _fault(name: object, value: object) -> str | None:
    """Why ``name: value`` is dropped ("name", "number", "finite"), or None to keep it."""
    if not isinstance(name, str) or not health_entry(name, 0.0):
        return "name"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "number"
    try:
        finite = math.isfinite(float(value))
    except (OverflowError, ValueError, TypeError):
        return "finite"
    return None if finite and health_entry(name, float(value)) else "finite"


_WHY = {
    "name": f"names are not 1-{MAX_HEALTH_NAME} characters from A-Z a-z 0-9 . _ -",
    "number": "values are not numbers (an int or float; not a bool)",
    "finite": "values are not finite (NaN, infinity, or too large for a float)",
    "many": f"names come after the first {MAX_HEALTH} by name",
}


def _said(kind: str, which: list[str]) -> str:
    return f"health callback: dropped {len(which)} number(s) whose {_WHY[kind]}: {which[0]}" + (
        f" and {len(which) - 1} more" if len(which) > 1 else ""
    )


class HealthWatch:
    """Calls ``health`` at start and every ``interval`` seconds on a daemon thread, and
    hands ``record`` the numbers kept (None after a failed call) and the wall time.

    ``stop()`` ends it without waiting: a call in progress finishes on its own,
    and what it returns is not recorded.
    """

    def __init__(
        self,
        health: Health,
        interval: float,
        record: Callable[[dict[str, float] | None, float], None],
        log: logging.Logger,
    ) -> None:
        self._health, self._interval, self._record, self._log = health, interval, record, log
        self._stop = threading.Event()
        self._said: set[str] = set()
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        """Start the thread (once)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        """Call the callback once and record what it gave (not once stopped)."""
        at = time.time()
        try:
            kept, problems = clean(self._health())
        except Exception as e:  # the user's callback: never the agent's end
            why = f"health callback raised {type(e).__name__}: {e}"[:MAX_ERROR]
            kept, problems = None, [(why, why)]
        for kind, line in problems:
            if kind not in self._said and len(self._said) < MAX_PROBLEMS:
                self._said.add(kind)
                self._log.warning("%s", line)
        if not self._stop.is_set():
            self._record(kept, at)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # pragma: no cover - a bug in record(); the watch goes on
                self._log.exception("recording health numbers failed")
            self._stop.wait(self._interval)
