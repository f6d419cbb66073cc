"""Instant local revert and post-apply probes (issue 17), against a real redis-server.

``Agent.revert()`` puts back what the last apply replaced from host memory;
a probe that fails puts it back before any reader sees the new weights. A
reverted or probe-failed version counts as refused: the agent does not apply
it again, and goes on to newer ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from agent_support import MODEL, Ten, bump, snapshot
from delta_support import nudged

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import HotswapError, ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

Make = Callable[..., Agent]


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    with Publisher(MODEL, settings=settings) as p:
        yield p


@pytest.fixture
def make(settings: HotswapSettings) -> Iterator[Make]:
    made: list[Agent] = []

    def build(model: Any, **kwargs: Any) -> Agent:
        s = kwargs.pop("settings", settings)
        agent = Agent(model, MODEL, settings=s, **kwargs).start()
        made.append(agent)
        return agent

    yield build
    for agent in made:
        agent.stop()


def test_revert_puts_the_previous_version_back_and_refuses_the_reverted_one(
    make: Make, pub: Publisher, store: Store
) -> None:
    model = Ten()
    agent = make(model)
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    at_v1 = snapshot(model)
    v2 = pub.publish(bump(model.state_dict(), 0.5))
    assert agent.wait_for(v2, 10) and snapshot(model) != at_v1

    assert agent.revert() == v1
    assert snapshot(model) == at_v1 and agent.applied_version == v1
    reverted = r"v2 rejected: reverted: by Agent\.revert\(\), from host memory"
    with pytest.raises(ValidationError, match=reverted):
        agent.wait_for(v2, 1)
    # Head is still v2: the agent looks again at its next polls and leaves it refused.
    asked = [0]

    def two_more_steps() -> bool:
        asked[0] += 1
        return asked[0] > 2

    assert agent._pipeline.state.wait_until(two_more_steps, 10)
    assert store.head() == v2 and agent.applied_version == v1 and snapshot(model) == at_v1
    record = agent.reporter.status
    assert record.version == v1 and record.rejected_version == v2
    # Nothing more to revert, and a newer version applies as usual.
    with pytest.raises(HotswapError, match="nothing to revert"):
        agent.revert()
    v3 = pub.publish(bump(model.state_dict(), 0.25))
    assert agent.wait_for(v3, 10) and agent.applied_version == v3


def test_revert_of_a_sparse_delta_scatters_its_elements_back(make: Make, pub: Publisher) -> None:
    g = torch.Generator().manual_seed(4)
    state = {"w": torch.randn(256, 256, generator=g).to(torch.bfloat16)}
    live = {"w": state["w"].clone()}
    reports: list[Any] = []
    agent = make(live, on_applied=lambda _v, report: reports.append(report))
    v1 = pub.publish(state)
    assert agent.wait_for(v1, 10)
    before = codec.digest(codec.as_bytes(live["w"]))
    v2 = pub.publish({"w": nudged(state["w"], 1, count=40)})
    assert pub.last_report.tensors_delta == 1
    assert agent.wait_for(v2, 10)
    assert reports[-1].tensors_patched == 1  # scattered in, so scattered back
    assert agent.revert() == v1
    assert codec.digest(codec.as_bytes(live["w"])) == before


def test_a_failed_probe_leaves_the_model_as_it_was_and_refuses_the_version(
    make: Make, pub: Publisher
) -> None:
    model = Ten()
    calls: list[float] = []

    def small_head(m: Ten) -> str | None:
        calls.append(float(m.head.weight.abs().max()))
        return None if calls[-1] < 5 else f"head weight reached {calls[-1]:.1f}"

    agent = make(model, probes=[small_head])
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    at_v1 = snapshot(model)
    bad = bump(model.state_dict())
    bad["head.weight"][0, 0] = 9.0  # valid bytes, a bad model
    v2 = pub.publish(bad)
    probed = r"v2 rejected: a post-apply probe: probe small_head: head weight reached 9\.0$"
    with pytest.raises(ValidationError, match=probed):
        agent.wait_for(v2, 10)
    # The probe saw the new weights; readers never did: they are back.
    assert calls[-1] == 9.0 and snapshot(model) == at_v1 and agent.applied_version == v1
    assert agent.reporter.status.rejected_version == v2
    v3 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v3, 10) and calls[-1] < 5


def test_a_probe_that_raises_fails_the_version(make: Make, pub: Publisher) -> None:
    model = Ten()

    def broken(m: Ten) -> str | None:
        raise RuntimeError("probe bug")

    agent = make(model)
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    agent.stop()
    at_v1 = snapshot(model)
    second = make(model, probes=[broken])
    v2 = pub.publish(bump(model.state_dict()))
    with pytest.raises(ValidationError, match="probe broken: raised RuntimeError: probe bug"):
        second.wait_for(v2, 10)
    assert snapshot(model) == at_v1


def test_no_revert_budget_means_no_revert_and_probed_versions_are_refused(
    make: Make, pub: Publisher, settings: HotswapSettings
) -> None:
    none = settings.model_copy(update={"revert_bytes": 0})
    model = Ten()
    agent = make(model, settings=none)
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    with pytest.raises(HotswapError, match="nothing to revert"):
        agent.revert()
    agent.stop()
    at_v1 = snapshot(model)
    probed = make(model, settings=none, probes=[lambda m: None])
    v2 = pub.publish(bump(model.state_dict()))
    with pytest.raises(
        ValidationError, match=r"exceed the revert budget \(HOTSWAP_REVERT_BYTES=0\)"
    ):
        probed.wait_for(v2, 10)
    assert snapshot(model) == at_v1


def test_revert_inside_a_read_is_refused(make: Make, pub: Publisher) -> None:
    from hotswap.errors import ConfigError

    model = Ten()
    agent = make(model)
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    with agent.reading(), pytest.raises(ConfigError, match="revert\\(\\) was called inside"):
        agent.revert()
    assert agent.applied_version == v1


def test_a_probation_that_fails_reverts_the_version_once_traffic_met_it(
    make: Make, pub: Publisher
) -> None:
    import threading

    from hotswap.postapply import Probation

    model = Ten()
    ran = threading.Event()
    refused = threading.Event()

    def error_rate_ok(m: Ten) -> str | None:
        ran.set()
        big = float(m.head.weight.abs().max())
        return None if big < 5 else f"error rate 7% with head weight {big:.0f}"

    agent = make(
        model,
        probes=[Probation(error_rate_ok, seconds=0.2)],
        on_rejected=lambda _v, _reasons: refused.set(),
    )
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10) and ran.wait(10)
    at_v1 = snapshot(model)
    bad = bump(model.state_dict())
    bad["head.weight"][0, 0] = 9.0
    v2 = pub.publish(bad)
    assert agent.wait_for(v2, 10)  # applied: the window lets traffic meet it first
    assert snapshot(model) != at_v1
    assert refused.wait(10)  # the check ran after 0.2 s and failed
    assert snapshot(model) == at_v1 and agent.applied_version == v1
    with pytest.raises(ValidationError, match=r"reverted: probation failed: probe error_rate_ok"):
        agent.wait_for(v2, 1)


def test_a_probation_for_a_version_already_replaced_does_nothing(
    make: Make, pub: Publisher
) -> None:
    import threading

    from hotswap.postapply import Probation

    model = Ten()
    seen: list[float] = []
    checked = threading.Event()

    def head_small(m: Ten) -> str | None:
        seen.append(float(m.head.weight.abs().max()))
        checked.set()
        return None if seen[-1] < 5 else "too big"

    # A window long enough that v3 lands within v2's on a loaded machine.
    agent = make(model, probes=[Probation(head_small, seconds=2.0)])
    first = bump(model.state_dict())
    bad = bump(first)
    bad["head.weight"][0, 0] = 9.0
    v1 = pub.publish(first)
    assert agent.wait_for(v1, 10)
    v2 = pub.publish(bad)
    assert agent.wait_for(v2, 10)
    v3 = pub.publish(bump(first, 0.02))  # replaces v2 within its window
    assert agent.wait_for(v3, 10)
    # Windows end in the order they began: v1's and v2's found a newer version
    # running and stood down unchecked; the first check to run is v3's.
    assert checked.wait(10)
    assert len(seen) == 1 and seen[0] < 5 and agent.applied_version == v3
