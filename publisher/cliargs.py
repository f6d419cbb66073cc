"""Argument types the ``hotswap`` commands share: versions, seconds, durations, ``--wait``.

Each refuses a bad value with one line argparse prints (exit 2, nothing done).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any


def version(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"version must be a number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"version must be 1 or more, got {v}")
    return v


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more, got {text}")
    return v


# ``--wait`` alone: the seconds ``publisher.await_fleet.DEFAULT_TIMEOUT`` says
# (not imported from there: it imports the store, and parsing must stay light).
DEFAULT_WAIT = 60.0


def wait_option(p: Any, help_: str) -> None:
    p.add_argument(
        "--wait",
        nargs="?",
        const=DEFAULT_WAIT,
        type=seconds,
        metavar="SECONDS",
        help=help_,
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """Seconds of ``120s``, ``2m``, ``500ms``, ``1h`` or a bare number (seconds).

    Example:
        >>> duration("2m"), duration("500ms"), duration("30")
        (120.0, 0.5, 30.0)
    """
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 120s, 2m or 500ms")
    return float(found.group(1)) * _UNIT[found.group(2)]
