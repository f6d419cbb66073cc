"""Agents applying delta versions: only what they can use is fetched, every byte checked.

Versions are made by hand (tests/delta_support.py): a model of a 10 KiB
weight (three 4 KiB chunks, so three frames) and a bias, each version a
sparse step of both, stored as the test says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from agent_support import MODEL, announce, snapshot, status_of, until
from delta_support import FrameWatch, Versions, flip, nudged

from hotswap import codec, keys, staging
from hotswap import manifest as mf
from hotswap.agent import Agent, ApplyReport
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Policy
from publisher import render, views
from publisher.publisher import Publisher


class Net(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(40, 64, generator=g))
        self.b = torch.nn.Parameter(torch.randn(64, generator=g))


def step(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    return {k: nudged(t, seed=seed * 7 + i) for i, (k, t) in enumerate(sorted(state.items()))}


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def runs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    live = model.state_dict()
    return all(bytes(codec.as_bytes(live[k])) == bytes(codec.as_bytes(t)) for k, t in state.items())


def deltas(vs: Versions, *versions: int, only: str | None = None) -> int:
    """The stored bytes of every tensor's (or ``only``'s) delta in ``versions``."""
    return sum(
        e.delta.stored_bytes
        for v in versions
        for e in vs.manifests[v].tensors
        if e.delta and only in (None, e.name)
    )


class Harness:
    """A watched agent (slow polls: notices drive it) and its reports."""

    def __init__(self, settings: HotswapSettings) -> None:
        self.settings = settings.model_copy(update={"poll_interval": 30.0})
        self.agents: list[Agent] = []
        self.reports: list[ApplyReport] = []
        self.rejected: dict[int, dict[str, list[str]]] = {}

    def start(self, model: torch.nn.Module, **kwargs: Any) -> tuple[Agent, FrameWatch]:
        watch = FrameWatch()
        agent = Agent(
            model,
            MODEL,
            settings=self.settings,
            store_factory=watch.factory,
            on_applied=lambda v, r: self.reports.append(r),
            on_rejected=self.rejected.__setitem__,
            **kwargs,
        )
        self.agents.append(agent.start())
        return agent, watch


@pytest.fixture
def harness(settings: HotswapSettings) -> Iterator[Harness]:
    h = Harness(settings)
    yield h
    for agent in h.agents:
        agent.stop()


def test_an_agent_at_the_parent_fetches_only_the_delta(harness: Harness, store: Store) -> None:
    model = Net()
    vs = Versions(store)
    v1 = vs.commit(state_of(model), default="full")
    agent, watch = harness.start(model)
    assert agent.wait_for(v1, 10)
    reads = watch.count("read")
    v2 = vs.commit(step(vs.states[v1], 2))
    assert all(e.delta is not None for e in vs.manifests[v2].tensors)
    assert agent.wait_for(v2, 10)
    assert runs(model, vs.states[v2])
    assert watch.count("read") == reads  # no full blob
    assert watch.count("frames") == 2 and watch.frame_bytes == deltas(vs, v2)
    assert harness.reports[-1].bytes_fetched == deltas(vs, v2) < 10 * 1024 // 10
    s = status_of(store, agent, lambda s: s.version == v2)
    assert s.bytes_fetched == deltas(vs, v2)
    assert s.last_fetched == deltas(vs, v2)  # what the version applied last cost
    assert s.encodings == ["shuffle-zstd", "sparse-zstd", "xor-zstd"]
    (row,) = views.status_view(store)["agents"]
    assert row["last_fetched"] == deltas(vs, v2)


def test_a_late_agent_reaches_head_through_a_keyframe_and_a_chain(
    harness: Harness, store: Store
) -> None:
    vs = Versions(store)
    state = state_of(Net())
    vs.commit(state, default="full")
    for k in range(2, 8):  # v2-v3 deltas, v4 keyframe, v5-v7 deltas
        state = step(state, k)
        vs.commit(state, default="keyframe" if k == 4 else "delta")
    model = Net(seed=1)  # unrelated weights
    agent, watch = harness.start(model)
    assert agent.wait_for(7, 10)
    assert runs(model, vs.states[7])
    keyframes = sum(e.nbytes for e in vs.manifests[4].tensors)
    assert harness.reports[-1].bytes_fetched == keyframes + deltas(vs, 5, 6, 7)
    assert watch.count("read") == 2 and watch.count("frames") == 6


def test_an_agent_that_missed_versions_skips_to_the_newest_by_the_cheapest_route(
    harness: Harness, store: Store
) -> None:
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    agent, _ = harness.start(model)
    assert agent.wait_for(1, 10)
    state = vs.states[1]
    for k in range(2, 7):  # published faster than announced: no notices
        state = step(state, k)
        vs.commit(state, default="keyframe" if k == 4 else "delta", notify=False)
    state = step(state, 7)
    v7 = vs.commit(state)
    assert agent.wait_for(v7, 10)
    assert runs(model, vs.states[v7])
    assert [r.version for r in harness.reports] == [1, v7]
    # Per tensor, the cheaper of six deltas from what runs and v4's keyframe and three.
    fetched = {
        name: min(
            deltas(vs, 2, 3, 4, 5, 6, 7, only=name),
            vs.entry(4, name).nbytes + deltas(vs, 5, 6, 7, only=name),
        )
        for name in ("w", "b")
    }
    assert fetched["w"] == deltas(vs, 2, 3, 4, 5, 6, 7, only="w")  # the live route
    assert harness.reports[-1].bytes_fetched == sum(fetched.values())


def test_rollbacks_by_one_step_and_by_many_read_deltas_backwards(
    harness: Harness, store: Store
) -> None:
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    agent, watch = harness.start(model)
    state = vs.states[1]
    for k in range(2, 6):
        state = step(state, k)
        assert agent.wait_for(vs.commit(state), 10)
    # By one: v5's own delta, read backwards, takes v5 back to v4.
    back = vs.commit(vs.states[4], default="back", rollback_to=4)
    assert agent.wait_for(back, 10)
    assert runs(model, vs.states[4])
    assert harness.reports[-1].bytes_fetched == deltas(vs, 5)
    # By many: a rollback to v2 (its entries: deltas from v1) from v4's content.
    many = vs.rollback(2)
    assert agent.wait_for(many, 10)
    assert runs(model, vs.states[2])
    assert harness.reports[-1].bytes_fetched == deltas(vs, 3, 4)
    assert watch.count("read") == 0


def test_a_corrupted_delta_frame_rejects_the_version_and_changes_nothing(
    harness: Harness, store: Store
) -> None:
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    agent, _ = harness.start(model)
    assert agent.wait_for(1, 10)
    before = snapshot(model)
    v2 = vs.commit(step(vs.states[1], 2), notify=False)
    flip(store.client, vs.frame_key(v2, "w", 0), at=50)
    announce(store, v2, vs.manifests[v2].lineage)
    assert until(agent, lambda: v2 in harness.rejected)
    assert snapshot(model) == before and agent.applied_version == 1
    (why,) = harness.rejected[v2]["w"]
    assert why.startswith(
        f"model 'm' v{v2} tensor 'w': cannot be reconstructed from stored blobs: "
    )
    # The flipped byte is a chunk digest the frame carries: not the signed one.
    assert "delta blob of v2 does not carry the chunk digests its manifest signs" in why
    assert "b" not in harness.rejected[v2]
    # It keeps serving, and takes the next good version (full: v2 is a broken link).
    v3 = vs.commit(step(vs.states[1], 3), default="full")
    assert agent.wait_for(v3, 10) and runs(model, vs.states[v3])


def test_a_redis_that_lost_blobs_makes_agents_fetch_full_blobs_never_wrong_bytes(
    harness: Harness, store: Store
) -> None:
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    agent, watch = harness.start(model)
    assert agent.wait_for(1, 10)
    # A keyframe whose delta is lost: the full blob instead.
    v2 = vs.commit(step(vs.states[1], 2), default="keyframe", notify=False)
    store.client.delete(vs.frame_key(v2, "w", 1))
    announce(store, v2, vs.manifests[v2].lineage)
    assert agent.wait_for(v2, 10) and runs(model, vs.states[v2])
    assert watch.count("read") == 1  # w's full blob; b's delta was fine
    # A delta whose base is gone for an agent that does not run it: refused.
    v3 = vs.commit(step(vs.states[v2], 3), notify=False)
    store.client.delete(*vs.full_keys(v2, "w"), *vs.full_keys(1, "w"))
    fresh = Net(seed=5)
    before = snapshot(fresh)
    late, _ = harness.start(fresh)
    assert until(late, lambda: v3 in harness.rejected)
    assert snapshot(fresh) == before and late.applied_version is None
    assert "cannot be reconstructed from stored blobs" in harness.rejected[v3]["w"][0]
    # The agent at v2 runs the base: it still takes v3 from its own bytes.
    announce(store, v3, vs.manifests[v3].lineage)
    assert agent.wait_for(v3, 10) and runs(model, vs.states[v3])


def test_an_unknown_delta_encoding_is_refused_before_any_fetch(
    harness: Harness, store: Store
) -> None:
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    agent, watch = harness.start(model)
    assert agent.wait_for(1, 10)
    before = snapshot(model)
    reads = watch.count("read")
    v2 = vs.commit(step(vs.states[1], 2), notify=False)
    m = vs.manifests[v2]
    future = tuple(
        replace(e, delta=replace(e.delta, encodings=("zfp-3",))) if e.name == "w" and e.delta else e
        for e in m.tensors
    )

    store.client.set(
        keys.manifest_key(store.ns, store.model, v2), mf.encode(replace(m, tensors=future))
    )
    announce(store, v2, m.lineage)
    assert until(agent, lambda: v2 in harness.rejected)
    assert harness.rejected[v2] == {
        "w": [
            f"model 'm' v{v2} tensor 'w' uses delta encoding 'zfp-3', which this agent does "
            "not know; upgrade hotswap"
        ]
    }
    assert snapshot(model) == before
    assert watch.count("read") == reads and watch.count("frames") == 0
    v3 = vs.commit(step(vs.states[1], 3), default="full")  # what this agent can read
    assert agent.wait_for(v3, 10) and runs(model, vs.states[v3])


def test_status_shows_what_each_agent_reads(harness: Harness, store: Store) -> None:
    model = Net()
    vs = Versions(store)
    v1 = vs.commit(state_of(model), default="full")
    agent, _ = harness.start(model)
    status_of(store, agent, lambda s: s.version == v1)
    view = views.status_view(store)
    (row,) = view["agents"]
    assert row["encodings"] == ["shuffle-zstd", "sparse-zstd", "xor-zstd"]
    table = render.status_table(view)
    assert [c.header for c in table.columns[-2:]] == ["fetched last", "reads"]
    assert next(iter(table.columns[-2].cells)) == "0.00 MB"  # it ran v1's bytes already
    assert next(iter(table.columns[-1].cells)).plain == "full, shuffle-zstd, sparse-zstd, xor-zstd"
    assert render.reads(None).plain == "full only"  # an agent older than deltas


def test_versions_the_publisher_stores_as_deltas_are_applied_from_them(
    harness: Harness, settings: HotswapSettings, store: Store
) -> None:
    small = settings.model_copy(update={"chunk_bytes": 4096})
    model = Net()
    with Publisher(MODEL, settings=small) as pub:
        v1 = pub.publish(state_of(model))
        agent, watch = harness.start(model)
        assert agent.wait_for(v1, 10)
        state = step(state_of(model), 2)
        v2 = pub.publish(state)
        assert agent.wait_for(v2, 10) and runs(model, state)
        entries = store.manifest(v2).tensors
        assert all(e.delta is not None for e in entries)
        assert harness.reports[-1].bytes_fetched == sum(
            e.delta.stored_bytes for e in entries if e.delta
        )
        assert watch.count("read") == 0  # v1 was the live model already: nothing read
        states = {v2: state}
        for k in range(3, 7):
            state = step(state, k)
            states[v := pub.publish(state)] = state
        assert agent.wait_for(v, 10) and runs(model, state)
        late_model = Net(seed=9)
        late, _ = harness.start(late_model)
        assert late.wait_for(v, 10) and runs(late_model, state)
        back = pub.rollback(to=v2)
        assert agent.wait_for(back, 10) and runs(model, states[v2])
        assert harness.reports[-1].bytes_fetched < sum(e.nbytes for e in entries) // 5
        assert pub.verify(back).ok and pub.verify(v).ok


@pytest.mark.parametrize("mode", ["auto", "pinned", "device"])
@pytest.mark.parametrize("arena", [True, False])
def test_prepare_stages_a_delta_in_every_staging_mode(
    store: Store, mode: staging.Staging, arena: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not arena:  # per-tensor host buffers, as CUDA models take
        monkeypatch.setattr(staging, "_in_arena", lambda device, mode: False)
    model = Net()
    vs = Versions(store)
    vs.commit(state_of(model), default="full")
    v2 = vs.commit(step(vs.states[1], 2))
    live = staging.LiveModel(model)
    before = snapshot(model)
    staged, reasons = staging.prepare(
        store.blobs,
        vs.manifests[v2],
        live,
        live.digests(),
        Policy(),
        mode=mode,
        where=f"model 'm' v{v2}",
        history=store,
    )
    assert reasons == {} and snapshot(model) == before  # the live tensors were only read
    assert staged.bytes_fetched == deltas(vs, v2)
    assert all(torch.equal(staged.tensors[k], t) for k, t in vs.states[v2].items())
    staged.release()
