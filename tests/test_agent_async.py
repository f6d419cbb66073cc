"""Readers in asyncio code: handlers that hold the model across awaits while the
agent applies versions from a real Redis never see two versions."""

from __future__ import annotations

import asyncio

import pytest
import redis
import torch

from hotswap.agent import Agent
from hotswap.errors import ConfigError
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher

MODEL = "m"
VERSIONS = 6


def _state(k: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((256,), k), "b": torch.full((256,), k)}


def test_overlapping_async_handlers_see_one_version_while_the_agent_applies(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    model = _state(0.0)
    publisher = Publisher(MODEL, settings=settings)
    publisher.publish(_state(1.0))
    seen: list[tuple[float, float, float]] = []

    async def handler(agent: Agent, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with agent.reading_async():
                a = float(model["a"][0])
                await asyncio.sleep(0)  # other handlers and the agent's thread run here
                b = float(model["b"][-1])
                await asyncio.sleep(0)
                seen.append((a, b, float(model["a"][-1])))

    async def main(agent: Agent) -> int:
        stop = asyncio.Event()
        handlers = [asyncio.create_task(handler(agent, stop)) for _ in range(8)]
        for v in range(2, VERSIONS + 1):
            publisher.publish(_state(float(v)))
            assert await asyncio.to_thread(agent.wait_for, v, 10)
        stop.set()
        await asyncio.gather(*handlers)
        return agent.applied_version or 0

    with Agent(model, MODEL, settings=settings) as agent:
        assert agent.wait_for(1, 10)
        applied = asyncio.run(main(agent))
    assert applied == VERSIONS
    assert seen and all(a == b == c for a, b, c in seen), [s for s in seen if len(set(s)) > 1][:3]
    assert len({a for a, _, _ in seen}) > 1  # versions changed while handlers read


def test_sync_reading_shared_by_two_tasks_is_refused_and_changes_nothing(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    model = _state(0.0)
    Publisher(MODEL, settings=settings).publish(_state(1.0))

    async def main(agent: Agent) -> None:
        holds, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            with agent.reading():
                holds.set()
                await release.wait()

        task = asyncio.create_task(first())
        await holds.wait()
        with pytest.raises(ConfigError, match=r"another asyncio task"), agent.reading():
            pass  # pragma: no cover
        with pytest.raises(ConfigError, match=r"apply_pending\(\) was called inside"):
            agent.apply_pending()
        release.set()
        await task

    with Agent(model, MODEL, settings=settings, mode="manual") as agent:
        asyncio.run(main(agent))
        assert agent.applied_version is None
    assert float(model["a"][0]) == 0.0
