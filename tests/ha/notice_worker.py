"""``ha_worker.py`` that also tells each subscription it opens and each notice it hears.

For ``test_sharded_notices``: the same serving process, with two more kinds
of event line (``time.monotonic()``, one clock for every process of the host):

    SUBSCRIBED <node host:port, or "plain"> <monotonic>
    NOTICE <node host:port, or "plain"> <monotonic>
    FETCHED <version> <monotonic when its fetch began>

The hooks wrap ``Subscription`` and ``on_applied``; Redis is real throughout.
``--plain`` makes the agent listen as agents before shard channels did (a
plain ``SUBSCRIBE`` only), for rolling-upgrade tests.

    python tests/ha/notice_worker.py 'redis://a:7000,b:7001' MODEL --poll 30 [--plain]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ha_worker

from hotswap.agent import Agent
from hotswap.subscription import Subscription

_init = Subscription.__init__
_get = Subscription.get


def _subscribed(self: Subscription, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    ha_worker.say("SUBSCRIBED", self.node or "plain", time.monotonic())


def _heard(self: Subscription, timeout: float) -> bytes | None:
    raw = _get(self, timeout)
    if raw is not None:
        ha_worker.say("NOTICE", self.node or "plain", time.monotonic())
    return raw


class _TellingAgent(Agent):
    """An Agent whose ``on_applied`` also says when the version's fetch began."""

    def __init__(self, *args: Any, on_applied: Any = None, **kwargs: Any) -> None:
        def applied(version: int, report: Any) -> None:
            ha_worker.say("FETCHED", version, report.fetch_started)
            if on_applied is not None:
                on_applied(version, report)

        super().__init__(*args, on_applied=applied, **kwargs)


Subscription.__init__ = _subscribed  # type: ignore[method-assign]
Subscription.get = _heard  # type: ignore[method-assign]
ha_worker.Agent = _TellingAgent  # type: ignore[misc]

if __name__ == "__main__":
    if "--plain" in sys.argv:
        sys.argv.remove("--plain")
        Subscription._open_sharded = lambda self: None  # type: ignore[method-assign]
    sys.exit(ha_worker.main())
