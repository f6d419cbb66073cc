"""The exit codes of the ``hotswap`` command (``hotswap demo`` included), in one table."""

from __future__ import annotations

from hotswap.errors import HotswapError, StoreUnavailable

OK = 0
"""Success."""
USER_ERROR = 1
"""A bad file, unknown model or version, a conflict, a failed verification, Redis out of
memory (``StoreFull``: it answers, but needs memory freed), or a bug."""
USAGE = 2
"""The command line did not parse (argparse's own code)."""
UNREACHABLE = 3
"""Redis could not be reached (``StoreUnavailable``)."""
UNHEALTHY = 4
"""The command worked, but the fleet is not healthy: ``hotswap status`` found a live
agent that rejected head or is diverged, or ``publish --wait`` / ``rollback`` committed
a version that a live agent rejected or did not apply in time (so a deploy script can
stop on it)."""
INTERRUPTED = 130
"""Ctrl-C or SIGTERM: the shell's code for a process ended by SIGINT."""


def for_error(error: HotswapError) -> int:
    """The exit code a command ends with after ``error``."""
    return UNREACHABLE if isinstance(error, StoreUnavailable) else USER_ERROR
