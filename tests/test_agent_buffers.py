"""Non-persistent buffers: live tensors a version may name (checked and updated in place
like any other) or leave out (``state_dict()`` lacks them, so they are never missing).

The issue's case is ``transformers``' ``embeddings.position_ids``: the model's own
``model.safetensors`` from the Hub holds it, the ``BertModel`` of ``transformers`` 5
keeps it out of ``state_dict()``. Built from a config: nothing is downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotswap import codec
from hotswap.agent import Agent, ApplyReport
from hotswap.errors import ValidationError
from hotswap.live import LiveModel, non_persistent_buffers
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher


class Positions(torch.nn.Module):
    """A linear layer and a non-persistent buffer, as ``position_ids``."""

    ids: torch.Tensor

    def __init__(self, seed: int = 0, length: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("ids", torch.arange(length).unsqueeze(0), persistent=False)


def everything(model: torch.nn.Module) -> dict[str, bytes]:
    """The bytes of every parameter and buffer, non-persistent ones included."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: bytes(codec.as_bytes(v)) for k, v in named.items()}


def test_a_live_model_knows_non_persistent_buffers_as_optional() -> None:
    model = Positions()
    live = LiveModel(model)
    assert set(model.state_dict()) == {"fc.weight", "fc.bias"}
    assert set(live.tensors) == {"fc.weight", "fc.bias", "ids"}
    assert live.optional == {"ids"}
    assert set(live.required) == {"fc.weight", "fc.bias"}
    assert live.tensors["ids"] is model.ids
    assert [n for n, _ in non_persistent_buffers(torch.nn.Sequential(model))] == ["0.ids"]
    # A mapping has no buffers of any kind: everything is required.
    assert LiveModel(model.state_dict()).optional == frozenset()
    # One no version could carry is left out: the agent still starts.
    with warnings.catch_warnings():  # quantized dtypes are deprecated: still served
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    model.register_buffer("q", q, persistent=False)
    assert LiveModel(model).optional == {"ids"}


def test_a_toy_buffer_is_updated_in_place_when_named_and_kept_when_not(
    settings: HotswapSettings,
) -> None:
    served, trained = Positions(seed=0), Positions(seed=1)
    where = served.ids.data_ptr()
    reports: list[ApplyReport] = []
    with Agent(
        served, "toy", settings=settings, on_applied=lambda v, r: reports.append(r)
    ) as agent:
        with Publisher("toy", settings=settings) as pub:
            shifted = {**trained.state_dict(), "ids": trained.ids + 1}
            v1 = pub.publish(shifted, message="with the buffer, shifted")
            assert agent.wait_for(v1, 30)
            assert torch.equal(served.ids, trained.ids + 1)
            assert served.ids.data_ptr() == where
            assert torch.equal(served.fc.weight, trained.fc.weight)
            assert reports[-1].tensors_changed == 3

            again = Positions(seed=2)
            # The publisher holds a full publish to head's names: the buffer is
            # dropped from the version by name (the agent would take either).
            v2 = pub.publish(again.state_dict(), exclude=["ids"], message="no buffer")
            assert agent.wait_for(v2, 30)
    assert torch.equal(served.fc.weight, again.fc.weight)
    assert torch.equal(served.ids, trained.ids + 1)  # left as it was
    assert agent.last_rejection is None


def test_a_buffer_of_the_wrong_shape_is_refused_and_nothing_changes(
    settings: HotswapSettings,
) -> None:
    served = Positions(seed=0)
    before = everything(served)
    other = Positions(seed=1, length=5)
    with Agent(served, "toy", settings=settings) as agent:
        with Publisher("toy", settings=settings) as pub:
            v1 = pub.publish({**other.state_dict(), "ids": other.ids}, message="ids of 5")
            with pytest.raises(ValidationError) as e:
                agent.wait_for(v1, 30)
    assert str(e.value) == (
        f"model 'toy' v{v1} rejected, 1 tensor(s) failed validation: "
        "'ids': shape [1, 5] differs from the live tensor's [1, 8]"
    )
    assert everything(served) == before


transformers = pytest.importorskip("transformers")


def bert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return transformers.BertModel(config).eval()  # type: ignore[no-any-return]


def test_a_bert_checkpoint_with_position_ids_applies_without_fetching_the_buffers(
    settings: HotswapSettings, tmp_path: Path
) -> None:
    served, trained = bert(0), bert(1)
    assert "embeddings.position_ids" not in served.state_dict()
    # As the Hub's file is: the state dict and the buffers transformers 5 keeps out of it.
    hub_file = tmp_path / "model.safetensors"
    buffers = dict(non_persistent_buffers(trained))
    assert set(buffers) == {"embeddings.position_ids", "embeddings.token_type_ids"}
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file({**state, **buffers}, str(hub_file))
    live = served.state_dict()
    differ = {k: t for k, t in state.items() if not torch.equal(t, live[k])}
    assert 0 < len(differ) < len(state)  # LayerNorms start equal
    reports: list[ApplyReport] = []
    with Agent(
        served, "minilm", settings=settings, on_applied=lambda v, r: reports.append(r)
    ) as agent:
        with Publisher("minilm", settings=settings) as pub:
            v1 = pub.publish(hub_file, message="the model's own file")
            assert agent.wait_for(v1, 30)
    assert everything(served) == everything(trained)
    # The buffers' bytes equal the live ones: nothing of them is fetched.
    assert reports[-1].tensors_changed == len(differ)
    assert reports[-1].bytes_fetched == sum(t.numel() * t.element_size() for t in differ.values())


def test_a_bert_state_dict_without_the_buffers_still_applies(settings: HotswapSettings) -> None:
    served, trained = bert(0), bert(1)
    with Agent(served, "minilm", settings=settings) as agent:
        with Publisher("minilm", settings=settings) as pub:
            v1 = pub.publish(trained.state_dict(), message="from state_dict()")
            assert agent.wait_for(v1, 30)
    assert everything(served) == everything(trained)
    assert agent.last_rejection is None
