"""A rollback through a relative check: an agent lets back contents it ran before.

The issue's case: MiniLM's ``pooler.dense.bias`` is all zeros in the original
checkpoint, a fine-tune moves it, and the rollback to the original was refused
by the norm ratio (``0 is outside [0.1, 10]``) for ever. An agent that ran the
original lets it back (the relative checks skipped for it, nothing else); a
fresh agent, which remembers nothing, still refuses it.
"""

from __future__ import annotations

import torch

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings
from hotswap.validate import Policy
from publisher.publisher import Publisher

MODEL = "pooler"


class Pooler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dense = torch.nn.Linear(8, 8)
        with torch.no_grad():
            self.dense.bias.zero_()  # as the original checkpoint's pooler


def original() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in Pooler().state_dict().items()}


def fine_tuned() -> dict[str, torch.Tensor]:
    state = original()
    return {"dense.weight": state["dense.weight"] * 1.01, "dense.bias": torch.full((8,), 0.05)}


def loaded(state: dict[str, torch.Tensor]) -> Pooler:
    model = Pooler()
    model.load_state_dict(state)
    return model


def raw(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: bytes(codec.as_bytes(v)) for k, v in model.state_dict().items()}


def test_a_rollback_to_contents_the_agent_ran_passes_where_a_fresh_agent_refuses(
    settings: HotswapSettings,
) -> None:
    v1_state, v2_state = original(), fine_tuned()
    # Serving the original as loaded: v1 changes nothing, as the model's own file did.
    ran = Pooler()
    fresh = loaded(v2_state)
    # The relative change would refuse the way back too, as the ratio does.
    policy = Policy(max_relative_change=0.5)
    with Publisher(MODEL, settings=settings) as pub, Agent(ran, MODEL, settings=settings) as a:
        v1 = pub.publish(v1_state, message="the original")
        assert a.wait_for(v1, 30)
        v2 = pub.publish(v2_state, message="fine-tuned")
        assert a.wait_for(v2, 30)
        with Agent(fresh, MODEL, settings=settings, policy=policy) as b:
            assert b.wait_for(v2, 30)
            fresh_before = raw(fresh)
            v3 = pub.rollback(to=v1)
            assert a.wait_for(v3, 30)
            try:
                b.wait_for(v3, 30)
            except ValidationError as e:
                refused = e
            else:
                raise AssertionError("the fresh agent applied the rollback")
    assert raw(ran) == raw(loaded(v1_state))
    assert a.last_rejection is None
    old = f"{codec.norm(v2_state['dense.bias']):.6g}"
    assert str(refused) == (
        f"model 'pooler' v{v3} rejected, 1 tensor(s) failed validation: 'dense.bias': "
        f"norm ratio new/old 0 is outside [0.1, 10] (norm {old} -> 0); "
        "relative change ||new-old||/||old|| 1 exceeds 0.5"
    )
    assert raw(fresh) == fresh_before


def test_contents_ran_before_still_take_the_finite_checks_and_the_users_validators(
    settings: HotswapSettings,
) -> None:
    refuse_zeros = False

    def no_zero_bias(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
        zero = name.endswith("bias") and not bool(new.any())
        return "an all-zero bias" if refuse_zeros and zero else None

    model = Pooler()
    policy = Policy(validators=[no_zero_bias])
    with (
        Publisher(MODEL, settings=settings) as pub,
        Agent(model, MODEL, settings=settings, policy=policy) as agent,
    ):
        v1 = pub.publish(original(), message="the original")
        assert agent.wait_for(v1, 30)
        v2 = pub.publish(fine_tuned(), message="fine-tuned")
        assert agent.wait_for(v2, 30)
        before = raw(model)
        refuse_zeros = True
        v3 = pub.rollback(to=v1)
        try:
            agent.wait_for(v3, 30)
        except ValidationError as e:
            refused = e
        else:
            raise AssertionError("the validator did not run on the rollback")
    assert refused.reasons == {"dense.bias": ["validator no_zero_bias: an all-zero bias"]}
    assert raw(model) == before
