"""The issue's path in a serving process of its own: a ``transformers`` BERT served
with an agent (tests/hf_worker.py) takes the model's own file (which holds the
non-persistent ``position_ids``), a fine-tune that moves the all-zero pooler
bias, and the rollback to the original, which the relative checks used to
refuse for ever."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from waiting import poll
from worker_proc import worker

from hotswap.live import non_persistent_buffers
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("hf_worker.py")
MODEL = "minilm"


def worker_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(WORKER.parent))
    try:
        import hf_worker
    finally:
        sys.path.pop(0)
    return hf_worker


def hub_file(model: torch.nn.Module, path: Path) -> Path:
    """As the Hub's file is: the state dict and the non-persistent buffers."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **dict(non_persistent_buffers(model))}, str(path))
    return path


def test_a_served_bert_takes_its_own_file_a_fine_tune_and_the_rollback(
    settings: HotswapSettings, store: Store, tmp_path: Path
) -> None:
    hf = worker_module()
    original = hf.bert(0)
    assert not bool(original.pooler.dense.bias.any())  # all zeros, as MiniLM's
    tuned = hf.bert(0)
    with torch.no_grad():
        tuned.pooler.dense.weight.mul_(1.01)
        tuned.pooler.dense.bias.fill_(0.05)
    with worker(WORKER, settings.redis_url, MODEL, 3, Store(store.client, MODEL)) as w:
        with Publisher(MODEL, settings=settings) as pub:
            v1 = pub.publish(hub_file(original, tmp_path / "v1.safetensors"), message="own")
            assert poll(lambda: w.runs(v1)), "the worker did not apply its own file"
            v2 = pub.publish(hub_file(tuned, tmp_path / "v2.safetensors"), message="tuned")
            assert poll(lambda: w.runs(v2)), "the worker did not apply the fine-tune"
            v3 = pub.rollback(to=v1)
        result = w.result()
    assert (v1, v2, v3) == (1, 2, 3)
    assert result["refused"] is None
    assert result["reached"] is True
    # v1 equals what it serves (nothing changed); v2 moved the pooler; v3 moved it back.
    assert result["applied"] == [
        {"version": 1, "changed": 0},
        {"version": 2, "changed": 2},
        {"version": 3, "changed": 2},
    ]
    assert result["digests"] == hf.digests(original)
    assert "embeddings.position_ids" in result["digests"]
