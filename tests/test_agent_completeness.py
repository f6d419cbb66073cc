"""An agent refuses a version that leaves out tensors its model has (issue 13, defect 10).

The versions here are written by hand (``commit_raw``): the publisher refuses
a full publish that omits tensors of its parent, but an older publisher, a
publish with no parent, or anyone who can write to Redis can still make one.
"""

from __future__ import annotations

import pytest
import torch
from agent_support import MODEL, Ten, Watch, bump, commit_raw, snapshot, status_of

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Policy

MISSING = (
    "missing: the version has no tensor of this name and the model would keep its own "
    "(publish it, or set Policy(missing_tensors='keep'))"
)


def test_a_version_without_one_of_the_models_tensors_is_refused(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    new = bump(model.state_dict())
    del new["layers.3.weight"]
    v = commit_raw(store, new)
    before = snapshot(model)
    with Agent(model, MODEL, settings=settings, store_factory=Watch().factory) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert str(e.value) == (
            f"model 'm' v{v} rejected, 1 tensor(s) failed validation: 'layers.3.weight': {MISSING}"
        )
        assert e.value.reasons == {"layers.3.weight": [MISSING]}
        assert snapshot(model) == before and agent.applied_version is None
        assert status_of(store, agent, lambda s: s.rejected_version == v).rejection == {
            "layers.3.weight": [MISSING]
        }


def test_keep_applies_the_version_and_keeps_the_live_tensor(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten()
    kept = bytes(codec.as_bytes(model.state_dict()["layers.3.weight"]))
    new = bump(model.state_dict())
    del new["layers.3.weight"]
    v = commit_raw(store, new)
    policy = Policy(missing_tensors="keep")
    with Agent(model, MODEL, settings=settings, policy=policy) as agent:
        assert agent.wait_for(v, 10)
    live = model.state_dict()
    assert bytes(codec.as_bytes(live["layers.3.weight"])) == kept
    assert all(bytes(codec.as_bytes(live[k])) == bytes(codec.as_bytes(t)) for k, t in new.items())


class TiedHead(torch.nn.Module):
    """An embedding and an output projection that share one weight, as in GPT-2 or BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.lm_head = torch.nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.embed.weight


def test_a_tied_weight_the_version_leaves_out_is_covered_by_its_twin(
    settings: HotswapSettings, store: Store
) -> None:
    model = TiedHead()
    new = {"embed.weight": model.embed.weight.detach() + 0.01}  # no lm_head.weight, as in HF
    v = commit_raw(store, new)
    with Agent(model, MODEL, settings=settings) as agent:
        assert agent.wait_for(v, 10)
    assert torch.equal(model.lm_head.weight, new["embed.weight"])
    assert model.lm_head.weight is model.embed.weight
