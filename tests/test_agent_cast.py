"""An agent casts a published dtype to its model's only where the policy allows it (issue 15).

The digest is checked over the bytes as published; the published values are
checked against the manifest, the cast must not overflow, and the other checks
(and the user's validators) see the cast values the model will run.
"""

from __future__ import annotations

import pydantic
import pytest
import torch
from agent_support import MODEL, Ten, bump, commit_raw, snapshot

from hotswap import codec
from hotswap.agent import Agent, ApplyReport
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Policy

TO_BF16 = Policy(cast=[("F32", "BF16")])


def as_bytes(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: bytes(codec.as_bytes(v)) for k, v in state.items()}


def test_without_permission_a_dtype_mismatch_is_refused_as_before(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten().to(torch.bfloat16)
    v = commit_raw(store, bump({k: t.float() for k, t in model.state_dict().items()}))
    before = snapshot(model)
    with Agent(model, MODEL, settings=settings) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons["head.weight"] == ["dtype F32 differs from the live tensor's BF16"]
        assert len(e.value.reasons) == 10
        assert snapshot(model) == before and agent.applied_version is None


def test_an_allowed_cast_applies_the_cast_values_and_validators_see_them(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten().to(torch.bfloat16)
    new = bump({k: t.float() for k, t in model.state_dict().items()})
    v = commit_raw(store, new)
    seen: list[torch.dtype] = []

    def sees(name: str, t: torch.Tensor, old: torch.Tensor) -> None:
        seen.append(t.dtype)

    reports: list[ApplyReport] = []
    policy = TO_BF16.model_copy(update={"validators": [sees]})
    with Agent(
        model, MODEL, settings=settings, policy=policy, on_applied=lambda v, r: reports.append(r)
    ) as agent:
        assert agent.wait_for(v, 10)
        assert snapshot(model) == as_bytes({k: t.to(torch.bfloat16) for k, t in new.items()})
        assert seen == [torch.bfloat16] * 10
        # The same published bytes again: the agent knows they run (by their digest).
        again = commit_raw(store, new)
        assert agent.wait_for(again, 10)
        assert reports[-1].tensors_changed == 0 and reports[-1].bytes_fetched == 0


def test_a_cast_that_overflows_is_refused_and_nothing_changes(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten().to(torch.float16)
    new = bump({k: t.float() for k, t in model.state_dict().items()})
    new["head.weight"][0, 0] = 1e6  # beyond fp16's largest finite value
    v = commit_raw(store, new)
    before = snapshot(model)
    policy = Policy(cast=[("F32", "F16")], norm_ratio=None)
    with Agent(model, MODEL, settings=settings, policy=policy) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {
            "head.weight": ["casting F32 to F16 overflows: 1 of 32 values become infinite"]
        }
        assert snapshot(model) == before and agent.applied_version is None


def test_published_values_are_checked_before_the_cast(
    settings: HotswapSettings, store: Store
) -> None:
    model = Ten().to(torch.bfloat16)
    new = bump({k: t.float() for k, t in model.state_dict().items()})
    new["scale"][3] = float("nan")
    v = commit_raw(store, new)
    before = snapshot(model)
    with Agent(model, MODEL, settings=settings, policy=TO_BF16) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {"scale": ["1 of 16 values are not finite (NaN or inf)"]}
        assert snapshot(model) == before


def test_only_floating_point_casts_can_be_allowed() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"cast \('F32', 'I8'\) names 'I8'"):
        Policy(cast=[("F32", "I8")])
