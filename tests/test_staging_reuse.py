"""No fresh pages at every version (issue 18): with the default settings an agent keeps
the last version's staging arena whatever its size and stages the next version in it;
a budget (HOTSWAP_STAGING_KEEP_BYTES) under a version's size drops it after the apply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from agent_support import MODEL, until

from hotswap.agent import Agent
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher

MiB = 1024 * 1024


def big_model() -> dict[str, torch.Tensor]:
    # 8 MiB: over hostmem.ARENA_MIN_BYTES, so the arena is an anonymous mapping.
    return {f"w{i}": torch.zeros(512, 1024) for i in range(4)}


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    with Publisher(MODEL, settings=settings) as p:
        yield p


def test_the_default_keeps_one_arena_and_stages_every_version_in_it(
    settings: HotswapSettings, pub: Publisher
) -> None:
    assert settings.staging_keep_bytes is None  # the default under test
    model = big_model()
    arenas: list[int] = []
    with Agent(model, MODEL, settings=settings) as agent:
        for step in range(4):
            new = {k: torch.full_like(v, float(step + 1)) for k, v in model.items()}
            assert agent.wait_for(pub.publish(new), 10)
            assert until(agent, lambda: agent._memory.kept_bytes >= 8 * MiB)
            kept = agent._memory._kept
            assert kept is not None
            arenas.append(kept.data_ptr())
            assert all(torch.equal(model[k], new[k]) for k in new)
    assert len(set(arenas)) == 1, "each version was staged in the same kept arena"
    assert agent._memory.kept_bytes == 0  # stop() drops it


def test_a_budget_under_a_versions_size_frees_the_arena_after_the_apply(
    settings: HotswapSettings, pub: Publisher
) -> None:
    model = big_model()
    small = settings.model_copy(update={"staging_keep_bytes": 4 * MiB})
    with Agent(model, MODEL, settings=small) as agent:
        for step in range(2):
            new = {k: torch.full_like(v, float(step + 1)) for k, v in model.items()}
            assert agent.wait_for(pub.publish(new), 10)
            assert agent._memory.kept_bytes == 0  # over the budget: not kept
        one = {**{k: v.clone() for k, v in model.items()}, "w0": torch.full((512, 1024), 9.0)}
        assert agent.wait_for(pub.publish(one), 10)  # 2 MiB staged: within the budget
        assert until(agent, lambda: 0 < agent._memory.kept_bytes <= 4 * MiB)
