"""A real ``transformers`` checkpoint (built from a config, no download) published with
name maps and a cast: README's "Hugging Face models", its quoted errors, and the
``position_ids`` buffer older BERT files carry."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.embedded import EmbeddedRedis
from hotswap.errors import SourceError
from publisher import Publisher

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
OPTIONS = {"strip_prefix": "bert.", "exclude": ["classifier.*", "*.position_ids"], "dtype": "bf16"}


def hf_block() -> str:
    text = README.read_text()
    (body,) = [
        b
        for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
        if "BertForSequenceClassification" in b
    ]
    return body


def said(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def scratch(server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k in [k for k in os.environ if k.startswith("HOTSWAP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.setenv("HOTSWAP_POLL_INTERVAL", "0.5")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_example_runs_and_its_quoted_errors_are_the_publishers(scratch: Path) -> None:
    path = scratch / "hf_example.py"
    path.write_text(hf_block())
    ran = runpy.run_path(str(path), run_name="__main__")
    assert ran["v2"] == 2 and ran["agent"].applied_version == 2
    readme = said(README.read_text())
    ckpt = "bert-ckpt/model.safetensors"
    with Publisher("bert-mini") as pub:
        with pytest.raises(SourceError) as e:
            pub.publish(ckpt, exclude=["classifier.*"], dtype="bf16")
        message = str(e.value)
        assert message.startswith(f"{ckpt}: 0 of 39 tensors matched head v2's names; ")
        tail = "the names start with `bert.`: try strip_prefix='bert.' (--strip-prefix bert.)"
        assert message.endswith(tail)
        assert said("``0 of 39 tensors matched head v2's names; ... " + tail + "``") in readme
        with pytest.raises(SourceError) as e:
            pub.publish(ckpt, strip_prefix="bert.", exclude=["classifier.*"])
        quoted = "dtype F32 where head v2 has BF16 (cast with dtype='bf16', --dtype bf16)"
        assert f"{quoted}: 'embeddings.LayerNorm.bias'" in str(e.value)
        assert f"(`{quoted}`)" in readme
        assert pub.store.head() == 2


def test_an_older_file_with_position_ids_publishes_once_the_buffer_is_excluded(
    scratch: Path,
) -> None:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    served = transformers.BertModel(config).eval()
    trained = transformers.BertForSequenceClassification(config)
    trained.save_pretrained("ckpt")
    tensors = load_file("ckpt/model.safetensors")
    # What files saved by older transformers hold, and today's state_dict lacks.
    tensors["bert.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(tensors, "ckpt/model.safetensors")
    assert "embeddings.position_ids" not in served.state_dict()
    with Publisher("bert-old") as pub:
        assert pub.publish(served.state_dict()) == 1
        with pytest.raises(SourceError) as e:
            pub.publish("ckpt/model.safetensors", strip_prefix="bert.", exclude=["classifier.*"])
        assert str(e.value) == (
            "ckpt/model.safetensors: 1 tensor(s) do not fit head v1, and agents would refuse "
            "them: not in head v1 (leave them out with exclude=[GLOB], --exclude GLOB): "
            "'embeddings.position_ids'; nothing was uploaded; pass force=True (--force) if the "
            "model itself changed"
        )
        options = {**OPTIONS, "dtype": None}
        assert pub.publish("ckpt/model.safetensors", **options) == 2
        names = {e.name for e in pub.store.manifest(2).tensors}
        assert names == set(served.state_dict())
