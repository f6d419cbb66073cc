"""hotswap/probes.py: liveness and readiness, as pure rules and on a real agent."""

from __future__ import annotations

import doctest

import pytest
import redis
import torch
from agent_support import MODEL, Ten, bump, until

from hotswap import Readiness, probes, readiness
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.probes import judge
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher


@pytest.mark.parametrize(
    ("state", "applied", "head", "rejected", "seen", "ready", "reason"),
    [
        ("starting", None, None, None, False, False, "the agent has not read head from Redis yet"),
        # Idle for a moment before the first read of head: not yet ready.
        ("idle", None, None, None, False, False, "the agent has not read head from Redis yet"),
        (
            "disconnected",
            None,
            None,
            None,
            False,
            False,
            "Redis is unreachable and head was never read",
        ),
        (
            "idle",
            None,
            None,
            None,
            True,
            True,
            "no version is published: serving the model's own weights",
        ),
        ("idle", 4, 4, None, True, True, "runs head v4"),
        # Caught up once: Redis going away keeps it ready.
        ("disconnected", 4, 4, None, True, True, "runs head v4"),
        ("fetching", 3, 4, None, True, False, "catching up: runs v3, head is v4"),
        (
            "fetching",
            None,
            4,
            None,
            True,
            False,
            "catching up: runs the model's own weights, head is v4",
        ),
        ("pending", 3, 4, None, True, False, "catching up: runs v3, head is v4"),
        # A bad head must not take every replica out of service...
        ("idle", 3, 4, 4, True, True, "refused head v4: serving v3"),
        # ...but a replica that runs no published version is not one to send traffic to.
        ("idle", None, 4, 4, True, False, "refused head v4 and runs no published version"),
        # An older refusal says nothing about a newer head.
        ("fetching", 3, 5, 4, True, False, "catching up: runs v3, head is v5"),
        ("stopped", 4, 4, None, True, False, "the agent has stopped"),
    ],
)
def test_rules(
    state: str,
    applied: int | None,
    head: int | None,
    rejected: int | None,
    seen: bool,
    ready: bool,
    reason: str,
) -> None:
    verdict = judge(state, applied, head, rejected, seen=seen)
    assert (verdict.ready, verdict.reason) == (ready, reason)
    assert verdict.alive == (state != "stopped")


def test_as_dict_and_lag() -> None:
    assert judge("idle", 3, 5, 5).as_dict() == {
        "ready": True,
        "alive": True,
        "reason": "refused head v5: serving v3",
        "state": "idle",
        "version": 3,
        "head": 5,
        "lag": 2,
        "rejected_version": 5,
    }
    assert judge("idle", None, 5).lag is None


def test_docstring_examples_run() -> None:
    failed, attempted = doctest.testmod(probes, raise_on_error=False, verbose=False)
    assert attempted > 0 and failed == 0


def test_a_real_agent_before_and_after_its_first_look_an_apply_and_a_refusal(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    model = Ten()
    agent = Agent(model, MODEL, settings=settings)
    try:
        first = readiness(agent)
        assert isinstance(first, Readiness)
        assert (first.ready, first.alive, agent.head_seen) == (False, True, False)
        agent.start()
        # Nothing published: once head was read, the model's own weights are what to serve.
        assert until(agent, lambda: readiness(agent).ready)
        assert agent.head_seen and agent.head_version is None
        with Publisher(MODEL, settings=settings, connection=client) as pub:
            v1 = pub.publish(bump(model.state_dict()))
            assert agent.wait_for(v1, 10)
            assert until(agent, lambda: readiness(agent).reason == f"runs head v{v1}")
            bad = bump(model.state_dict())
            bad["head.weight"][0, 0] = float("nan")
            v2 = pub.publish(bad)
            with pytest.raises(ValidationError):
                agent.wait_for(v2, 10)
        check = readiness(agent)
        assert (check.ready, check.reason, check.lag) == (
            True,
            f"refused head v{v2}: serving v{v1}",
            1,
        )
    finally:
        agent.stop()
    stopped = readiness(agent)
    assert (stopped.ready, stopped.alive) == (False, False)
    assert torch.isfinite(model.head.weight).all()
