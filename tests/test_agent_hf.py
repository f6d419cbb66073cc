"""The issue's path with a real ``transformers`` model, agent side: a bf16 ``BertModel``
server, a ``BertForSequenceClassification`` checkpoint published as saved (names
``bert.…``, a classifier, fp32). Built from a config: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from agent_support import snapshot

from hotswap.agent import Agent, ApplyReport
from hotswap.errors import ValidationError
from hotswap.names import NameMap
from hotswap.settings import HotswapSettings
from hotswap.validate import Policy
from publisher.publisher import Publisher

transformers = pytest.importorskip("transformers")

MODEL = "bert-tiny"


def config() -> object:
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )


def test_a_checkpoint_published_as_saved_reaches_a_bf16_server_through_the_agents_map(
    settings: HotswapSettings, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    served = transformers.BertModel(config()).to(torch.bfloat16).eval()
    trained = transformers.BertForSequenceClassification(config())
    trained.save_pretrained(tmp_path)
    before = snapshot(served)
    live_names = sorted(served.state_dict())
    with Publisher(MODEL, settings=settings) as pub:
        v1 = pub.publish(tmp_path / "model.safetensors", message="as saved")

        with Agent(served, MODEL, settings=settings) as agent:
            with pytest.raises(ValidationError) as e:
                agent.wait_for(v1, 30)
        assert str(e.value) == (
            f"model 'bert-tiny' v{v1} rejected: 0 of {len(live_names)} live tensors matched "
            f"(at least 50% must); {len(live_names)} of the manifest's names match once `bert.` "
            "is removed: try `Agent(names=NameMap(strip_prefix='bert.'))`; not matched: "
            f"{', '.join(repr(n) for n in live_names[:3])} (+{len(live_names) - 3} more); the "
            "manifest's names not in the model: 'bert.embeddings.LayerNorm.bias', "
            "'bert.embeddings.LayerNorm.weight', 'bert.embeddings.position_embeddings.weight' "
            f"(+{len(live_names) - 1} more)"
        )
        assert snapshot(served) == before

        names = NameMap(strip_prefix="bert.", exclude=["classifier.*"])
        with Agent(served, MODEL, settings=settings, names=names) as agent:
            with pytest.raises(ValidationError) as e:
                agent.wait_for(v1, 30)
        assert set(e.value.reasons) == set(live_names)
        assert e.value.reasons["pooler.dense.weight"] == [
            "dtype F32 differs from the live tensor's BF16"
        ]
        assert snapshot(served) == before

        reports: list[ApplyReport] = []
        policy = Policy(cast=[("F32", "BF16")])
        with Agent(
            served,
            MODEL,
            settings=settings,
            names=names,
            policy=policy,
            on_applied=lambda v, r: reports.append(r),
        ) as agent:
            assert agent.wait_for(v1, 30)
            with torch.no_grad():  # a training step on the pooler only
                trained.bert.pooler.dense.weight.mul_(0.9)
            trained.save_pretrained(tmp_path)
            v2 = pub.publish(tmp_path / "model.safetensors", message="step 2")
            assert agent.wait_for(v2, 30)
    assert reports[-1].tensors_changed == 1
    expected = {k: t.to(torch.bfloat16) for k, t in trained.bert.state_dict().items()}
    assert all(torch.equal(served.state_dict()[k], t) for k, t in expected.items())
    with torch.no_grad():
        out = served(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.last_hidden_state.dtype == torch.bfloat16
