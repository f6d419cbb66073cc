"""hotswap/health.py and the record fields it feeds: an agent's health numbers, its track,
its probe failures and its pin, as they land in Redis.

Each test waits for the record it expects to land (``status_of``, woken by
every status write the agent makes), never for a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch
from agent_support import Ten, bump, cloned, status_of, watch_of, watched_agent

from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.health import clean
from hotswap.postapply import Probation
from hotswap.reporter import Reporter
from hotswap.settings import HotswapSettings
from hotswap.status import MAX_HEALTH, AgentStatus, decode
from hotswap.store import Store
from publisher.publisher import Publisher

Make = Callable[..., Agent]


@pytest.fixture
def quick(settings: HotswapSettings) -> HotswapSettings:
    """Health asked for every 50 ms, heartbeats every 0.3 s (ttl/3)."""
    return settings.model_copy(update={"health_interval": 0.05, "heartbeat_ttl": 0.9})


@pytest.fixture
def make(quick: HotswapSettings) -> Iterator[Make]:
    agents: list[Agent] = []

    def build(**kwargs: Any) -> Agent:
        agent, _ = watched_agent(
            kwargs.pop("model", Ten()), kwargs.pop("settings", quick), **kwargs
        )
        agents.append(agent)
        return agent.start()

    yield build
    for agent in agents:
        agent.stop()


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings)
    yield p
    p.close()


# -- what is kept of what a callback returns (pure) -------------------------------


def test_clean_keeps_finite_numbers_with_key_names_and_says_what_it_dropped() -> None:
    raw: dict[Any, Any] = {
        "error_rate": 0.5,
        "requests": 12,  # an int: kept as a float
        "p99 ms": 1.0,  # a space: not a key name
        "x" * 65: 1.0,  # over 64 characters
        "x" * 64: 2.0,  # 64: kept
        7: 1.0,  # not a string
        "up": True,  # a bool is no number
        "label": "fast",
        "nan": float("nan"),
        "inf": float("-inf"),
        "huge": 10**400,  # too large for a float
        "half": torch.tensor(0.5).item(),
    }
    kept, problems = clean(raw)
    assert kept == {"error_rate": 0.5, "requests": 12.0, "x" * 64: 2.0, "half": 0.5}
    assert all(type(v) is float for v in (kept or {}).values())
    assert [kind for kind, _ in problems] == ["name", "number", "finite"]
    said = dict(problems)
    assert said["name"].startswith(
        "health callback: dropped 3 number(s) whose names are not 1-64 characters from "
        "A-Z a-z 0-9 . _ -: 'p99 ms' and 2 more"
    )
    assert said["number"] == (
        "health callback: dropped 2 number(s) whose values are not numbers "
        "(an int or float; not a bool): 'up' and 1 more"
    )
    assert said["finite"].startswith("health callback: dropped 3 number(s) whose values are not")


def test_clean_keeps_the_first_names_up_to_the_limit() -> None:
    raw = {f"n{i:05}": float(i) for i in range(10_000)}
    kept, problems = clean(raw)
    assert kept == {f"n{i:05}": float(i) for i in range(MAX_HEALTH)}
    assert problems == [
        (
            "many",
            f"health callback: dropped {10_000 - MAX_HEALTH} number(s) whose names come after "
            f"the first {MAX_HEALTH} by name: n{MAX_HEALTH:05} and {10_000 - MAX_HEALTH - 1} more",
        )
    ]


@pytest.mark.parametrize("raw", [None, [("a", 1.0)], 0.5, "a=1"])
def test_clean_refuses_what_is_not_a_mapping(raw: object) -> None:
    assert clean(raw) == (
        None,
        [
            (
                "type",
                f"health callback returned {type(raw).__name__}, not a mapping of names to numbers",
            )
        ],
    )


# -- what lands in Redis ------------------------------------------------------------


def test_health_numbers_and_track_reach_the_record_and_follow_the_callback(
    make: Make, store: Store, quick: HotswapSettings
) -> None:
    numbers = {"error_rate": 0.5}
    agent = make(settings=quick.model_copy(update={"track": "canary"}), health=lambda: numbers)
    s = status_of(store, agent, lambda s: s.health == {"error_rate": 0.5})
    assert s.track == "canary" and s.health_at is not None and s.health_at <= s.updated
    numbers = {"error_rate": 0.25, "p99_ms": 40.0}
    s = status_of(store, agent, lambda s: s.health == {"error_rate": 0.25, "p99_ms": 40.0})
    assert s.health == {"error_rate": 0.25, "p99_ms": 40.0}
    # Read back through the records API too, as hotswap status does.
    (record,) = [r for r in store.agent_report().records if r.agent_id == agent.agent_id]
    assert record.alive


def test_an_agent_without_a_callback_reports_no_health_and_the_stable_track(
    make: Make, store: Store
) -> None:
    agent = make()
    s = status_of(store, agent, lambda s: s.state == "idle" or s.state == "starting")
    assert (s.track, s.health, s.health_at, s.probe_failures, s.pinned) == (
        "stable",
        None,
        None,
        0,
        None,
    )


def test_hostile_numbers_are_dropped_logged_once_and_heartbeats_go_on(
    make: Make, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    calls = [0]

    def hostile() -> Mapping[str, Any]:
        calls[0] += 1
        return {"ok": 1.0, "nan": float("nan"), "bad name": 2.0, "up": True}

    caplog.set_level(logging.WARNING, "hotswap.agent")
    agent = make(health=hostile)
    first = status_of(store, agent, lambda s: s.health is not None)
    assert first.health == {"ok": 1.0}
    # Three heartbeats later (the numbers do not change: only heartbeats write).
    status_of(store, agent, lambda s: s.updated > first.updated + 0.5)
    assert calls[0] > 3
    dropped = [r.getMessage() for r in caplog.records if "health callback" in r.getMessage()]
    assert len(dropped) == 3, dropped  # name, number, finite: each once
    assert watch_of(agent).written[-1].health == {"ok": 1.0}


def test_a_raising_callback_leaves_health_none_logged_once_per_error(
    make: Make, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    calls = [0]

    def broken() -> Mapping[str, float]:
        calls[0] += 1
        if calls[0] <= 3:
            raise RuntimeError("metrics backend down")
        if calls[0] <= 6:
            raise KeyError("p99")
        return {"error_rate": 0.0}

    caplog.set_level(logging.WARNING, "hotswap.agent")
    agent = make(health=broken)
    failing = status_of(store, agent, lambda s: s.health_at is not None)
    assert failing.health is None
    s = status_of(store, agent, lambda s: s.health == {"error_rate": 0.0})
    assert s.health_at is not None and s.health_at > (failing.health_at or 0)
    said = [r.getMessage() for r in caplog.records if "health callback" in r.getMessage()]
    assert said == [
        "health callback raised RuntimeError: metrics backend down",
        "health callback raised KeyError: 'p99'",
    ]


def test_a_callback_that_never_returns_does_not_stop_heartbeats(make: Make, store: Store) -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> Mapping[str, float]:
        entered.set()
        release.wait(30)
        return {"late": 1.0}

    try:
        agent = make(health=stuck)
        assert entered.wait(10)
        first = status_of(store, agent)
        # Two heartbeats (ttl/3 apart) land while the callback is still inside.
        s = status_of(store, agent, lambda s: s.updated > first.updated + 0.5)
        assert not release.is_set() and s.health is None and s.health_at is None
    finally:
        release.set()


def test_probe_failures_are_counted_with_the_last_reason(
    make: Make, store: Store, pub: Publisher
) -> None:
    verdict = ["held-out loss 3.1 > 2.5"]
    model = Ten()
    agent = make(model=model, probes=[lambda m: verdict[0]])
    v1 = pub.publish(bump(cloned(model)))
    with pytest.raises(ValidationError, match=r"held-out loss 3\.1 > 2\.5"):
        agent.wait_for(v1, 10)
    s = status_of(store, agent, lambda s: s.probe_failures == 1)
    assert s.last_probe == f"v{v1}: probe <lambda>: held-out loss 3.1 > 2.5"
    assert s.rejected_count == 1 and s.version is None

    # A version validation refuses is a rejection, not a probe failure.
    bad = bump(cloned(model))
    bad["layers.2.weight"][3, 3] = float("nan")
    v2 = pub.publish(bad)
    with pytest.raises(ValidationError):
        agent.wait_for(v2, 10)
    s = status_of(store, agent, lambda s: s.rejected_count == 2)
    assert (
        s.probe_failures == 1 and s.last_probe == f"v{v1}: probe <lambda>: held-out loss 3.1 > 2.5"
    )

    verdict[0] = "x" * 1000
    v3 = pub.publish(bump(cloned(model), 0.02))
    with pytest.raises(ValidationError):
        agent.wait_for(v3, 10)
    s = status_of(store, agent, lambda s: s.probe_failures == 2)
    assert s.last_probe is not None and len(s.last_probe) == 300
    assert s.last_probe.startswith(f"v{v3}: probe <lambda>: xxx")


def test_a_failed_probation_counts_and_a_revert_by_hand_does_not(
    make: Make, store: Store, pub: Publisher
) -> None:
    verdicts = iter(["error rate 9%"])
    model = Ten()
    agent = make(model=model, probes=[Probation(lambda m: next(verdicts, None), seconds=0.0)])
    # Applied, then reverted at once (a window of 0 s): whether wait_for sees it
    # applied or already refused is a race, so the record is what is waited on.
    v1 = pub.publish(bump(cloned(model)))
    s = status_of(store, agent, lambda s: s.probe_failures == 1)
    assert s.last_probe == f"v{v1}: probation failed: probe <lambda>: error rate 9%"
    assert s.version is None and v1 in (s.rejected_versions or [])

    v2 = pub.publish(bump(cloned(model), 0.02))
    assert agent.wait_for(v2, 10)
    status_of(store, agent, lambda s: s.version == v2)
    v3 = pub.publish(bump(cloned(model), 0.03))
    assert agent.wait_for(v3, 10)
    assert agent.revert() == v2
    s = status_of(store, agent, lambda s: s.version == v2 and s.rejected_count == 2)
    assert s.probe_failures == 1  # Agent.revert() is no probe failure


def test_a_pin_goes_into_the_record_and_away_again(store: Store) -> None:
    # A bare reporter: an agent's own looks set the pin from Redis (the rollout's).
    reporter = Reporter(store, "a-1", ttl=30.0, track="canary")
    log = logging.getLogger("test")

    def stored() -> AgentStatus:
        (record,) = store.agent_report().records
        assert record.data is not None
        return decode(record.data)

    reporter.update(pinned=3)
    assert reporter.flush(log)
    assert (stored().pinned, stored().track) == (3, "canary")
    reporter.update(pinned=None)
    assert reporter.flush(log)
    assert stored().pinned is None
