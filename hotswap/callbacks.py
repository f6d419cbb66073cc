"""The agent's user callbacks: their types, and calling one without letting it stop the agent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hotswap.reporter import ApplyReport

log = logging.getLogger("hotswap.agent")

OnApplied = Callable[[int, ApplyReport], None]
OnRejected = Callable[[int, dict[str, list[str]]], None]


def call(fn: Callable[..., None] | None, *args: Any) -> None:
    """``fn(*args)`` if given; an exception in it is logged, and the agent carries on."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("agent callback %r raised; the agent carries on", fn)
