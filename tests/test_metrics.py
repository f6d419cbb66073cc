"""hotswap/metrics.py: the gauges follow an apply and a rejection; docs/metrics.md lists all."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import redis
import torch
from agent_support import MODEL, Ten, bump, until
from waiting import poll

from hotswap import pins
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.pins import PinIO
from hotswap.settings import HotswapSettings
from hotswap.status import STATES
from publisher.publisher import Publisher
from publisher.rollout import Rollout

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"

Make = Callable[..., Agent]


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher(MODEL, settings=settings, connection=client)
    yield p
    p.close()


@pytest.fixture
def make(settings: HotswapSettings) -> Iterator[Make]:
    agents: list[Agent] = []

    def build(model: Any, start: bool = True, **kwargs: Any) -> Agent:
        agent = Agent(model, MODEL, settings=kwargs.pop("settings", settings), **kwargs)
        agents.append(agent)
        return agent.start() if start else agent

    yield build
    for agent in agents:
        agent.stop()


def gauge(name: str, agent: Agent, **extra: str) -> float | None:
    labels = {"model": MODEL, "agent": agent.agent_id, **extra}
    return prometheus_client.REGISTRY.get_sample_value(name, labels)


def standing(agent: Agent) -> tuple[float | None, float | None, float | None, str]:
    """(head, applied, lag, the one state whose gauge is 1) as Prometheus scrapes them."""
    states = [s for s in STATES if gauge("hotswap_agent_state", agent, state=s) == 1.0]
    assert len(states) == 1, states
    return (
        gauge("hotswap_head_version", agent),
        gauge("hotswap_applied_version", agent),
        gauge("hotswap_lag_versions", agent),
        states[0],
    )


def health(agent: Agent, name: str) -> float | None:
    """The agent's health number ``name`` as scraped (a label called name: not ``gauge``'s)."""
    labels = {"model": MODEL, "agent": agent.agent_id, "name": name}
    return prometheus_client.REGISTRY.get_sample_value("hotswap_health", labels)


def counter(name: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, {"model": MODEL}) or 0.0


def test_gauges_follow_an_apply_and_a_rejection(make: Make, pub: Publisher) -> None:
    model = Ten()
    agent = make(model, start=False)
    # Before its first look: a state, no head, no version.
    assert standing(agent) == (None, None, None, "starting")

    rejections = counter("hotswap_rejections_total")
    applies = counter("hotswap_apply_seconds_count")
    agent.start()
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    assert until(agent, lambda: standing(agent) == (v1, v1, 0, "idle"))
    assert counter("hotswap_apply_seconds_count") - applies == 1

    bad = bump(model.state_dict())
    bad["layers.2.weight"][3, 3] = float("nan")
    v2 = pub.publish(bad)
    with pytest.raises(ValidationError):
        agent.wait_for(v2, 10)
    # Refused: head moved on, the model did not; one version behind.
    assert until(agent, lambda: standing(agent) == (v2, v1, 1, "idle"))
    assert counter("hotswap_rejections_total") - rejections == 1
    assert agent.applied_version == v1 and agent.head_version == v2

    agent.stop()
    assert standing(agent) == (v2, v1, 1, "stopped")


def test_two_agents_of_one_model_are_told_apart_and_a_dropped_one_goes(
    make: Make, pub: Publisher
) -> None:
    first = make(Ten())
    second = make(Ten(), start=False)
    v = pub.publish(bump(Ten().state_dict()))
    assert first.wait_for(v, 10)
    assert standing(first)[:3] == (v, v, 0)
    assert standing(second) == (None, None, None, "starting")
    # One sample per agent: a scrape that Prometheus accepts (no duplicate series).
    text = prometheus_client.generate_latest().decode()
    rows = [line for line in text.splitlines() if line.startswith("hotswap_agent_state{")]
    assert len(rows) == len(set(rows))

    # Tracked weakly: an agent no longer referenced leaves the scrape.
    lone = Agent(Ten(), MODEL, settings=first.settings)
    lone_id = lone.agent_id
    state = {"model": MODEL, "agent": lone_id, "state": "stopped"}
    lone.stop()
    assert prometheus_client.REGISTRY.get_sample_value("hotswap_agent_state", state) == 1.0
    del lone
    gc.collect()
    assert prometheus_client.REGISTRY.get_sample_value("hotswap_agent_state", state) is None


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: name -> (type, labels)."""
    rows = re.findall(
        r"^\| `(hotswap_\w+)` \| (\w+) \| ([^|]*) \| [^|]{20,} \|$", DOC.read_text(), flags=re.M
    )
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def test_docs_list_every_metric_with_its_type_and_labels(
    make: Make, pub: Publisher, settings: HotswapSettings
) -> None:
    model = Ten()
    agent = make(model)
    # Health numbers and a probe failure, so that their series exist.
    quick = settings.model_copy(update={"health_interval": 0.05})
    probed = make(Ten(), settings=quick, probes=[lambda m: "bad"], health=lambda: {"x": 1.0})
    assert poll(lambda: health(probed, "x") == 1.0)
    v = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v, 10)
    with pytest.raises(ValidationError, match="probe <lambda>: bad"):
        probed.wait_for(v, 10)
    bad = bump(model.state_dict())
    bad["head.weight"][0, 0] = float("inf")
    with pytest.raises(ValidationError):
        agent.wait_for(pub.publish(bad), 10)
    again = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(again, 10)
    assert agent.revert() == v  # counted in hotswap_reverts_total
    # A rollout ends (rollout series), and a pin holds for the agent (its gauge).
    staged = pub.publish(bump(model.state_dict(), 0.3), promote=False)
    assert Rollout(pub, staged, canary="100%", bake=0, tick=0.02).run().state in (
        "promoted",
        "rolled_back",
    )
    base = pub.store.head()
    assert base is not None
    pinned = pub.publish(bump(model.state_dict(), 0.4), promote=False)
    PinIO(pub.store).write({pins.agent_field(agent.agent_id): pins.Pin(pinned, base)})
    assert poll(lambda: agent.reporter.status.pinned == pinned)

    exposed: dict[str, tuple[str, set[str]]] = {}
    for family in prometheus_client.REGISTRY.collect():
        if not family.name.startswith("hotswap_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        exposed[name] = (family.type, labels)
    assert documented() == exposed


def test_metrics_can_be_read_without_an_agent_thread(settings: HotswapSettings) -> None:
    # A model with nothing published and an agent never started: still one state.
    agent = Agent(torch.nn.Linear(2, 2), MODEL, settings=settings)
    try:
        assert gauge("hotswap_agent_state", agent, state="starting") == 1.0
        assert gauge("hotswap_head_version", agent) is None
    finally:
        agent.stop()


def test_health_numbers_and_track_are_read_at_each_scrape(
    make: Make, settings: HotswapSettings
) -> None:
    numbers = {"error_rate": 0.5, "p99_ms": 12.0}
    quick = settings.model_copy(update={"health_interval": 0.05, "track": "canary"})
    agent = make(Ten(), settings=quick, health=lambda: dict(numbers))
    assert poll(lambda: health(agent, "error_rate") == 0.5)
    assert health(agent, "p99_ms") == 12.0
    assert gauge("hotswap_agent_info", agent, track="canary") == 1.0
    assert gauge("hotswap_agent_info", agent, track="stable") is None
    numbers["error_rate"] = 0.25
    del numbers["p99_ms"]
    assert poll(lambda: health(agent, "error_rate") == 0.25)
    # A name the callback no longer returns leaves the scrape.
    assert health(agent, "p99_ms") is None


def test_an_agent_without_health_has_info_and_no_health_series(make: Make) -> None:
    agent = make(Ten(), start=False)
    assert gauge("hotswap_agent_info", agent, track="stable") == 1.0
    text = prometheus_client.generate_latest().decode()
    assert f'agent="{agent.agent_id}"' in text
    assert not [
        line
        for line in text.splitlines()
        if line.startswith("hotswap_health{") and f'agent="{agent.agent_id}"' in line
    ]


def test_a_probe_failure_is_counted_once_and_a_bad_value_is_not_one(
    make: Make, pub: Publisher
) -> None:
    model = Ten()
    agent = make(model, probes=[lambda m: "loss rose"])
    failures = counter("hotswap_probe_failures_total")
    rejections = counter("hotswap_rejections_total")
    with pytest.raises(ValidationError, match="probe <lambda>: loss rose"):
        agent.wait_for(pub.publish(bump(model.state_dict())), 10)
    assert counter("hotswap_probe_failures_total") - failures == 1
    assert counter("hotswap_rejections_total") - rejections == 1
    bad = bump(model.state_dict())
    bad["head.weight"][0, 0] = float("nan")
    with pytest.raises(ValidationError, match="not finite"):
        agent.wait_for(pub.publish(bad), 10)
    # Refused by validation, before any probe ran: a rejection, no probe failure.
    assert counter("hotswap_probe_failures_total") - failures == 1
    assert counter("hotswap_rejections_total") - rejections == 2
