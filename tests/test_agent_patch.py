"""Agents validate and apply a sparse delta of what they run from its changed elements.

Two agents of one model run side by side: ``fast`` with the default policy
(patch path), ``full`` with a validator that passes everything, which forces
the full checks (``hotswap.patchcheck``). Both must end with the same bytes,
or refuse a version with the very same reasons and keep what they ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from agent_support import MODEL, pointers, snapshot
from delta_support import Versions, nudged

from hotswap import codec
from hotswap.agent import Agent, ApplyReport
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Policy


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 96, generator=g).to(torch.bfloat16))
        self.v = torch.nn.Parameter(torch.randn(40, 64, generator=g))
        self.b = torch.nn.Parameter(torch.randn(64, generator=g))


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Parameter(torch.randn(64, 32, generator=g))
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb
        self.other = torch.nn.Parameter(torch.randn(64, 32, generator=g))


def passes(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
    return None


class Seen:
    """An ``on_applied`` callback keeping the reports."""

    def __init__(self, into: list[ApplyReport]) -> None:
        self.into = into

    def __call__(self, _version: int, report: ApplyReport) -> None:
        self.into.append(report)


class Pair:
    """A patch-path agent and a full-path agent of one model, and what they saw."""

    def __init__(self, settings: HotswapSettings, make: Any) -> None:
        self.settings = settings.model_copy(update={"poll_interval": 30.0})
        self.models = {"fast": make(), "full": make()}
        self.reports: dict[str, list[ApplyReport]] = {"fast": [], "full": []}
        self.rejected: dict[str, dict[int, dict[str, list[str]]]] = {"fast": {}, "full": {}}
        self.agents: dict[str, Agent] = {}

    def start(self, policy: Policy | None = None) -> None:
        policies = {
            "fast": policy or Policy(),
            "full": (policy or Policy()).model_copy(update={"validators": [passes]}),
        }
        for key, model in self.models.items():
            agent = Agent(
                model,
                MODEL,
                settings=self.settings,
                policy=policies[key],
                on_applied=Seen(self.reports[key]),
                on_rejected=self.rejected[key].__setitem__,
            )
            self.agents[key] = agent.start()

    def wait(self, version: int) -> None:
        for agent in self.agents.values():
            assert agent.wait_for(version, 10)

    def refused(self, version: int) -> dict[str, dict[str, list[str]]]:
        out = {}
        for key, agent in self.agents.items():
            with pytest.raises(Exception, match="rejected"):
                agent.wait_for(version, 10)
            out[key] = self.rejected[key][version]
        return out


@pytest.fixture
def pair_of(settings: HotswapSettings) -> Iterator[Any]:
    made: list[Pair] = []

    def make(model: Any) -> Pair:
        made.append(Pair(settings, model))
        return made[-1]

    yield make
    for p in made:
        for agent in p.agents.values():
            agent.stop()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def step(state: dict[str, torch.Tensor], seed: int, count: int = 40) -> dict[str, torch.Tensor]:
    """Each tensor with ``count`` elements changed (at most 1 in 32: a sparse patch)."""
    return {
        k: nudged(t, seed=seed * 7 + i, count=min(count, t.numel() // 32))
        for i, (k, t) in enumerate(state.items())
    }


def holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    live = model.state_dict()
    return all(bytes(codec.as_bytes(live[k])) == bytes(codec.as_bytes(t)) for k, t in state.items())


def test_a_sparse_delta_is_checked_and_applied_by_patch_bit_exact(
    pair_of: Any, store: Store
) -> None:
    pair = pair_of(Net)
    vs = Versions(store)
    v1 = vs.commit(state_of(pair.models["fast"]), default="full")
    pair.start()
    pair.wait(v1)
    where = pointers(pair.models["fast"])
    last = v1
    for k in range(2, 5):
        v = last = vs.commit(step(vs.states[last], k))
        assert all(e.delta is not None for e in vs.manifests[v].tensors)
        pair.wait(v)
        fast, full = pair.reports["fast"][-1], pair.reports["full"][-1]
        assert (fast.tensors_patched, fast.tensors_validated_by_patch) == (3, 3)
        # A validator forces the full checks; the writer lock still patches.
        assert (full.tensors_patched, full.tensors_validated_by_patch) == (3, 0)
        assert holds(pair.models["fast"], vs.states[v])
        assert snapshot(pair.models["fast"]) == snapshot(pair.models["full"])
    assert pointers(pair.models["fast"]) == where


def test_a_patch_making_a_value_nan_is_refused_as_the_full_checks_refuse_it(
    pair_of: Any, store: Store
) -> None:
    pair = pair_of(Net)
    vs = Versions(store)
    v1 = vs.commit(state_of(pair.models["fast"]), default="full")
    pair.start()
    pair.wait(v1)
    v2 = vs.commit(step(vs.states[v1], 2))
    pair.wait(v2)
    before = {k: snapshot(m) for k, m in pair.models.items()}
    bad = step(vs.states[v2], 3)
    bad["w"].view(-1)[17] = float("nan")
    bad["v"].view(-1)[5] = float("inf")
    v3 = vs.commit(bad)
    assert all(e.delta is not None for e in vs.manifests[v3].tensors)
    refused = pair.refused(v3)
    assert refused["fast"] == refused["full"]
    assert refused["fast"]["w"] == ["1 of 6144 values are not finite (NaN or inf)"]
    assert refused["fast"]["v"] == ["1 of 2560 values are not finite (NaN or inf)"]
    assert "b" not in refused["fast"]
    assert {k: snapshot(m) for k, m in pair.models.items()} == before


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (Policy(), "norm ratio new/old"),
        (Policy(norm_ratio=None, max_relative_change=1.0), "relative change ||new-old||/||old||"),
    ],
)
def test_a_patch_outside_the_bounds_is_refused_as_the_full_checks_refuse_it(
    pair_of: Any, store: Store, policy: Policy, reason: str
) -> None:
    pair = pair_of(Net)
    vs = Versions(store)
    v1 = vs.commit(state_of(pair.models["fast"]), default="full")
    pair.start(policy)
    pair.wait(v1)
    before = {k: snapshot(m) for k, m in pair.models.items()}
    bad = step(vs.states[v1], 2, count=3)
    bad["v"].view(-1)[7] = 1e4  # a few elements: the norm grows ~200x
    v2 = vs.commit(bad)
    refused = pair.refused(v2)
    assert refused["fast"] == refused["full"]
    assert list(refused["fast"]) == ["v"]
    (why,) = refused["fast"]["v"]
    assert why.startswith(reason)
    assert {k: snapshot(m) for k, m in pair.models.items()} == before


def test_tied_tensors_take_the_full_copy_and_stay_tied(pair_of: Any, store: Store) -> None:
    pair = pair_of(Tied)
    vs = Versions(store)
    v1 = vs.commit(state_of(pair.models["fast"]), default="full")
    pair.start()
    pair.wait(v1)
    nxt = step(vs.states[v1], 2)
    nxt["head.weight"] = nxt["emb"]
    v2 = vs.commit(nxt)
    pair.wait(v2)
    model = pair.models["fast"]
    report = pair.reports["fast"][-1]
    assert (report.tensors_patched, report.tensors_validated_by_patch) == (1, 1)  # "other"
    assert holds(model, vs.states[v2])
    assert model.head.weight is model.emb


def test_a_patch_of_many_elements_is_checked_by_patch_and_copied_whole(
    pair_of: Any, store: Store
) -> None:
    pair = pair_of(Net)
    vs = Versions(store)
    v1 = vs.commit(state_of(pair.models["fast"]), default="full")
    pair.start()
    pair.wait(v1)
    nxt = dict(vs.states[v1])
    w = nxt["w"]
    nxt["w"] = nudged(w, seed=5, count=w.numel() * 8 // 100)  # 8%: past SCATTER_MAX_FRACTION
    v2 = vs.commit(nxt)
    assert [e.name for e in vs.manifests[v2].tensors if e.delta is not None] == ["w"]
    pair.wait(v2)
    report = pair.reports["fast"][-1]
    assert (report.tensors_patched, report.tensors_validated_by_patch) == (0, 1)
    assert holds(pair.models["fast"], vs.states[v2])
