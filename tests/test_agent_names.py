"""An agent reads checkpoints whose names are not its model's, and refuses those that
match too little of it (issue 15).

The issue's worst finding: a checkpoint whose names all start with ``bert.``
was reported as applied (``v11 (0 tensors, 0 bytes fetched)``) while the
model ran the old weights. Versions here are mostly written by hand
(``commit_raw``): a publisher's own checks would refuse some of them first.
"""

from __future__ import annotations

import pytest
import torch
from agent_support import (
    MODEL,
    Ten,
    Watch,
    bump,
    cloned,
    commit_raw,
    equal_state,
    snapshot,
    status_of,
)
from delta_support import nudged

from hotswap.agent import Agent
from hotswap.errors import ConfigError, ValidationError
from hotswap.names import NameMap
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Policy
from publisher.publisher import Publisher

LENIENT = Policy(unknown_tensors="ignore", missing_tensors="keep")
BERT_REFUSED = (
    "0 of 10 live tensors matched (at least 50% must); the manifest's names start with "
    "`bert.`: try `Agent(names=NameMap(strip_prefix='bert.'))`; not matched: 'head.weight', "
    "'layers.0.bias', 'layers.0.weight' (+7 more); the manifest's names not in the model: "
    "'bert.head.weight', 'bert.layers.0.bias', 'bert.layers.0.weight' (+7 more)"
)


class Net(torch.nn.Module):
    """A 10 KiB weight (three 4 KiB chunks, so three delta frames) and a bias."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(40, 64, generator=g))
        self.b = torch.nn.Parameter(torch.randn(64, generator=g))


def step(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A sparse step of every tensor: the publisher stores it as a delta."""
    return {k: nudged(t, seed=seed * 7 + i) for i, (k, t) in enumerate(sorted(state.items()))}


def prefixed(state: dict[str, torch.Tensor], prefix: str = "bert.") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("policy", [LENIENT, Policy()], ids=["ignore-unknown", "default"])
def test_a_checkpoint_whose_names_all_carry_a_prefix_is_refused_not_applied(
    settings: HotswapSettings, store: Store, policy: Policy
) -> None:
    model = Ten()
    v1_state = bump(model.state_dict())
    v1 = commit_raw(store, v1_state)
    with Agent(model, MODEL, settings=settings, policy=policy, store_factory=Watch().factory) as a:
        assert a.wait_for(v1, 10)
        before = snapshot(model)
        v2 = commit_raw(store, prefixed(bump(v1_state)))
        with pytest.raises(ValidationError) as e:
            a.wait_for(v2, 10)
        assert str(e.value) == f"model 'm' v{v2} rejected: {BERT_REFUSED}"
        assert e.value.reasons == {"<coverage>": [BERT_REFUSED]}
        assert snapshot(model) == before
        assert a.applied_version == v1 and a.head_version == v2
        record = status_of(store, a, lambda s: s.rejected_version == v2)
        assert record.version == v1
        # The record keeps a reason's start: the count and the fix.
        assert record.rejection == {"<coverage>": [BERT_REFUSED[:300]]}
    assert store.head() == v2


def test_the_prefix_stripped_and_a_buffer_excluded_the_checkpoint_applies(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    new = bump(model.state_dict())
    published = prefixed(new) | {"bert.embeddings.position_ids": torch.arange(8)}
    v = commit_raw(store, published)
    names = NameMap(exclude=["*.position_ids"], strip_prefix="bert.")
    with Agent(model, MODEL, settings=settings, names=names) as agent:
        assert agent.wait_for(v, 10)
    assert equal_state(model, new)


def test_a_name_the_map_leaves_out_would_otherwise_be_unknown(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    published = bump(model.state_dict()) | {"embeddings.position_ids": torch.arange(8)}
    v = commit_raw(store, published)
    before = snapshot(model)
    with Agent(model, MODEL, settings=settings) as agent:
        with pytest.raises(ValidationError, match=r"'embeddings\.position_ids': unknown tensor"):
            agent.wait_for(v, 10)
        assert snapshot(model) == before


def test_too_small_a_share_is_refused_and_min_coverage_lowers_it(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    new = bump(model.state_dict())
    part = {k: new[k] for k in sorted(new)[:3]}  # 3 of 10 live names
    v = commit_raw(store, part)
    before = snapshot(model)
    with Agent(model, MODEL, settings=settings, policy=LENIENT) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert str(e.value) == (
            f"model 'm' v{v} rejected: 3 of 10 live tensors matched (at least 50% must); "
            "not matched: 'layers.1.bias', 'layers.1.weight', 'layers.2.bias' (+4 more)"
        )
        assert snapshot(model) == before
    low = LENIENT.model_copy(update={"min_coverage": 0.2})
    with Agent(model, MODEL, settings=settings, policy=low) as agent:
        assert agent.wait_for(v, 10)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in part.items())


def test_min_coverage_zero_still_refuses_a_version_that_matches_nothing(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    v = commit_raw(store, prefixed(bump(model.state_dict()), "other."))
    zero = LENIENT.model_copy(update={"min_coverage": 0.0})
    with Agent(model, MODEL, settings=settings, policy=zero) as agent:
        with pytest.raises(ValidationError, match=r"rejected: 0 of 10 live tensors matched; "):
            agent.wait_for(v, 10)
        assert agent.applied_version is None


def test_a_map_that_sends_two_names_to_one_refuses_the_version(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    new = bump(model.state_dict())
    v = commit_raw(store, new | {"module.head.weight": new["head.weight"]})
    before = snapshot(model)
    names = NameMap(strip_prefix="module.")
    with Agent(model, MODEL, settings=settings, names=names) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {
            "<names>": [
                "the name map maps both 'head.weight' and 'module.head.weight' to "
                "'head.weight': exclude one of them or rename it elsewhere"
            ]
        }
        assert snapshot(model) == before


def test_a_rename_callable_that_raises_refuses_the_version(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    v = commit_raw(store, bump(model.state_dict()))

    def rename(name: str) -> str:
        raise LookupError(name)

    before = snapshot(model)
    with Agent(model, MODEL, settings=settings, names=NameMap(rename=rename)) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {"<names>": ["the name map raised LookupError: head.weight"]}
        assert snapshot(model) == before


def test_names_and_transform_must_be_of_their_types(settings: HotswapSettings) -> None:
    with pytest.raises(ConfigError, match="names must be a NameMap, not dict"):
        Agent(Ten(), MODEL, settings=settings, names={"a": "b"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="transform must be a Transform, not function"):
        Agent(Ten(), MODEL, settings=settings, transform=lambda p, live: None)  # type: ignore[arg-type]


def test_delta_versions_of_prefixed_names_apply_through_the_map(
    settings: HotswapSettings, store: Store
) -> None:
    small = settings.model_copy(update={"chunk_bytes": 4096})
    model = Net()
    names = NameMap(strip_prefix="_orig_mod.")
    with Publisher(MODEL, settings=small) as pub:
        v1 = pub.publish(prefixed(cloned(model), "_orig_mod."))
        with Agent(model, MODEL, settings=settings, names=names) as agent:
            assert agent.wait_for(v1, 10)
            state = cloned(model)
            for k in range(2, 5):
                state = step(state, k)
                v = pub.publish(prefixed(state, "_orig_mod."))
            assert agent.wait_for(v, 10) and equal_state(model, state)
        assert all(e.delta is not None for e in store.manifest(v).tensors)
        # A fresh model rebuilds the deltas from older manifests, read through the map.
        late = Net(seed=9)
        with Agent(late, MODEL, settings=settings, names=names) as agent:
            assert agent.wait_for(v, 10) and equal_state(late, state)
