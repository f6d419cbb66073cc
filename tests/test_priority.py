"""The agent yields to serving (issue 18): its thread and the threads it starts run at
HOTSWAP_AGENT_NICE below the serving threads, with HOTSWAP_AGENT_THREADS threads for its
CPU work, while the writes under the writer lock keep the serving threads' priority."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from agent_support import MODEL, Ten, bump

from hotswap import priority
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher

linux = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def nice_here() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def pub(settings: HotswapSettings) -> Iterator[Publisher]:
    with Publisher(MODEL, settings=settings) as p:
        yield p


def _observe(settings: HotswapSettings, pub: Publisher, **changes: Any) -> dict[str, Any]:
    """What the agent's thread (on_applied runs there) and the writer-lock holder (a
    probe runs under the lock) see of their priority and thread budgets."""
    seen: dict[str, Any] = {}

    def on_applied(_version: int, _report: object) -> None:
        seen["agent_nice"] = nice_here()
        seen["agent_torch_threads"] = torch.get_num_threads()
        seen["agent_budget"] = priority.budget()
        seen["agent_thread"] = threading.current_thread().name

    def probe(_model: object) -> None:
        seen["writer_nice"] = nice_here()
        seen["writer_thread"] = threading.current_thread().name

    model = Ten()
    s = settings.model_copy(update=changes)
    with Agent(model, MODEL, settings=s, on_applied=on_applied, probes=[probe]) as agent:
        assert agent.wait_for(pub.publish(bump(model.state_dict())), 10)
    seen["serving_nice"] = nice_here()
    seen["serving_torch_threads"] = torch.get_num_threads()
    return seen


@linux
def test_the_agent_thread_runs_lowered_and_the_writer_lock_holder_does_not(
    settings: HotswapSettings, pub: Publisher
) -> None:
    base = nice_here()
    before = torch.get_num_threads()
    seen = _observe(settings, pub, agent_nice=7, agent_threads=1)
    assert seen["agent_nice"] == min(19, base + 7)
    assert seen["agent_budget"] == 1
    assert seen["agent_torch_threads"] == 1  # this thread's OpenMP count only
    # The apply (and its probes) ran on the foreground thread, at the starter's priority.
    assert seen["writer_nice"] == base
    assert seen["writer_thread"].startswith(f"hotswap-writer-{MODEL}")
    assert seen["agent_thread"] == f"hotswap-agent-{MODEL}"
    # The serving side is untouched: its priority and its torch threads.
    assert (seen["serving_nice"], seen["serving_torch_threads"]) == (base, before)


@linux
def test_threads_the_agent_starts_inherit_its_priority(
    settings: HotswapSettings, pub: Publisher
) -> None:
    seen: dict[str, int] = {}

    def on_applied(_version: int, _report: object) -> None:
        child = threading.Thread(target=lambda: seen.update(child=nice_here()))
        child.start()
        child.join()
        seen["lowered"] = int(priority.lowered())

    model = Ten()
    s = settings.model_copy(update={"agent_nice": 5})
    with Agent(model, MODEL, settings=s, on_applied=on_applied) as agent:
        assert agent.wait_for(pub.publish(bump(model.state_dict())), 10)
    assert seen == {"child": min(19, nice_here() + 5), "lowered": 1}


def test_nice_0_and_no_thread_limit_leave_the_agent_as_the_serving_threads(
    settings: HotswapSettings, pub: Publisher
) -> None:
    base = nice_here() if sys.platform == "linux" else 0
    seen = _observe(settings, pub, agent_nice=0, agent_threads=None)
    if sys.platform == "linux":
        assert seen["agent_nice"] == base == seen["writer_nice"]
    assert seen["agent_budget"] is None
    # What any new thread gets from torch (under OpenMP, each thread has its own count).
    plain: list[int] = []
    fresh = threading.Thread(target=lambda: plain.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen["agent_torch_threads"] == plain[0]
    # Not lowered: the apply runs on the agent's own thread, no hop.
    assert seen["writer_thread"] == f"hotswap-agent-{MODEL}"


def test_settings_refuse_a_nice_or_a_thread_count_out_of_range() -> None:
    with pytest.raises(ValueError, match="agent_nice"):
        HotswapSettings(agent_nice=20, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="agent_threads"):
        HotswapSettings(agent_threads=0, _env_file=None)  # type: ignore[call-arg]


def test_frame_work_stays_on_a_thread_held_to_one_and_spreads_otherwise() -> None:
    from hotswap import workers

    def names(limit: int | None) -> set[str]:
        out: list[set[str]] = []

        def run() -> None:
            priority.lower(0, limit)
            jobs = [lambda: threading.current_thread().name for _ in range(16)]
            out.append(set(workers.ordered(jobs)))

        t = threading.Thread(target=run, name="held")
        t.start()
        t.join()
        return out[0]

    assert names(1) == {"held"}  # HOTSWAP_AGENT_THREADS=1: no thread hops at all
    if workers.threads() > 1:
        assert all(n.startswith("hotswap-frames") for n in names(None))
