"""Log each change of the agent's state once, not at each retry."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("hotswap.agent")


class LogOnce:
    """Logs each change of state once, not each retry: remembers the key of the last thing said.

    The agent's thread and ``apply_pending()``'s caller both use it, hence its lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: str | None = None

    @property
    def last(self) -> str | None:
        with self._lock:
            return self._last

    def say(self, key: str, level: int, message: str, exc: BaseException | None = None) -> None:
        """Log ``message`` unless the last thing said had the same ``key``."""
        with self._lock:
            if self._last == key:
                return
            self._last = key
        log.log(level, "%s", message, exc_info=exc)

    def note(self, key: str) -> None:
        """Record a change of state logged elsewhere, so the next repeat is said again."""
        with self._lock:
            self._last = key

    def replace(self, old: str | None, new: str) -> None:
        """Record ``new`` unless something was said since ``old``."""
        with self._lock:
            if self._last == old:
                self._last = new
