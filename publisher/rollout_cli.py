"""``hotswap rollout``: the command line of ``publisher.rollout``.

Exit codes: 0 promoted (or head already), 4 not promoted (rolled back,
superseded by a newer head, or aborted; the reason is printed), 1 a user
error (another rollout holds the lease, no such version, no live agent),
3 Redis unreachable (rerun the same command: it resumes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from publisher.cliargs import duration, version
from publisher.exitcodes import OK, UNHEALTHY

if TYPE_CHECKING:
    from publisher.cli import Context


def add(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add the ``rollout`` command to the CLI's parser."""
    p = command(
        "rollout",
        "make an unpromoted version current on canaries, watch them, widen to the fleet "
        "and promote it, or roll the canaries back (exit 4)",
    )
    p.add_argument("model")
    p.add_argument("version", nargs="?", type=version, help="a version published with --no-promote")
    p.add_argument(
        "--canary",
        default="10%",
        help="the first step: a share of live agents (10%%) or a count (2); agents of the "
        "canary track are always in it (default 10%%)",
    )
    p.add_argument(
        "--steps",
        default="",
        help="comma-separated widenings after the canary, e.g. 25%%,50%%; 100%% "
        "(promotion) always comes last",
    )
    p.add_argument(
        "--bake",
        type=duration,
        default=60.0,
        help="how long each step is watched once its agents run the version (default 60s)",
    )
    p.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="a health number canaries report (Agent(health=...)) must stay at or under",
    )
    p.add_argument(
        "--min",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="a health number canaries report must stay at or over",
    )
    p.add_argument(
        "--failures",
        type=int,
        default=0,
        help="samples over a limit tolerated per canary before rolling back (default 0)",
    )
    p.add_argument(
        "--apply-timeout",
        type=duration,
        default=60.0,
        help="how long a step's agents have to run the version (default 60s)",
    )
    p.add_argument("--track", default="canary", help="the canary track (default canary)")
    p.add_argument(
        "--lease",
        type=duration,
        default=10.0,
        help="the owner lease: a rerun after this process died resumes once it expires",
    )
    p.add_argument(
        "--abort",
        action="store_true",
        help="end the model's unfinished rollout: canaries go back to head",
    )


def run(ctx: Context) -> int:
    """``hotswap rollout``."""
    from hotswap.errors import ConfigError
    from publisher.rollout import Outcome, Rollout, abort, parse_limits

    a = ctx.args
    with ctx.publisher(require=True) as pub:
        if a.abort:
            ended = abort(pub)
            if ended is None:
                ctx.emit(
                    {"model": pub.model, "aborted": None},
                    lambda: ctx.out.print(f"model {pub.model}: no unfinished rollout"),
                )
                return OK
            return _report(ctx, pub.model, ended)
        if a.version is None:
            raise ConfigError("hotswap rollout: name the VERSION to roll out (or use --abort)")
        limits = parse_limits([f"max:{x}" for x in a.max] + [f"min:{x}" for x in a.min])
        say: Callable[[str], None] = (
            (lambda _t: None) if ctx.json else (lambda t: ctx.out.print(f"rollout: {t}"))
        )
        outcome: Outcome = Rollout(
            pub,
            a.version,
            canary=a.canary,
            steps=[s for s in a.steps.split(",") if s.strip()],
            bake=a.bake,
            limits=limits,
            failure_limit=a.failures,
            apply_timeout=a.apply_timeout,
            track=a.track,
            lease=a.lease,
            say=say,
        ).run()
        return _report(ctx, pub.model, outcome)


def _report(ctx: Context, model: str, outcome: object) -> int:
    from publisher.rollout import Outcome

    assert isinstance(outcome, Outcome)
    record = outcome.record
    data = {
        "model": model,
        "version": outcome.version,
        "state": outcome.state,
        "reason": outcome.reason,
        "verdicts": [] if record is None else record.verdicts,
    }
    line = f"model {model}: v{outcome.version} {outcome.state.replace('_', ' ')}"
    if outcome.reason:
        line += f": {outcome.reason}"
    ctx.emit(data, lambda: ctx.out.print(line))
    return OK if outcome.promoted else UNHEALTHY
