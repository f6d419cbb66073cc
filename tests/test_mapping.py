"""publisher.mapping: a checkpoint's names mapped and its floats cast, without a server."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotswap import codec
from hotswap.errors import ConfigError, SourceError
from publisher import mapping
from publisher.mapping import SourceMapping, cast_dtype, rename_pairs
from publisher.sources import from_state_dict, open_source


def checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "module.bert.embeddings.position_ids": torch.arange(8).unsqueeze(0),
        "module.bert.embeddings.word_embeddings.weight": torch.randn(16, 4, generator=g),
        "module.bert.pooler.dense.weight": torch.randn(4, 4, generator=g),
        "module.classifier.weight": torch.randn(2, 4, generator=g),
    }


def test_names_are_stripped_renamed_and_excluded_in_the_sources_order() -> None:
    t = SourceMapping.of(
        ["*.position_ids", "module.classifier.*"],
        {"pooler.dense.weight": "pool.weight"},
        ["module.", "bert."],
    )
    src = t.apply(from_state_dict(checkpoint(), "ckpt"))
    # One prefix is removed, the first that matches: `bert.` stays after `module.`.
    assert src.names == ["bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"]
    t = SourceMapping.of(
        rename=lambda n: n.removeprefix("module.bert."), exclude=["*.position_ids"]
    )
    src = t.apply(from_state_dict(checkpoint(), "ckpt"))
    assert src.names == [
        "embeddings.word_embeddings.weight",
        "pooler.dense.weight",
        "module.classifier.weight",
    ]
    assert torch.equal(
        src.load("pooler.dense.weight"), checkpoint()["module.bert.pooler.dense.weight"]
    )
    assert src.stable  # no cast: the state dict's own tensors, ties visible


def test_identity_transform_is_the_source_itself() -> None:
    raw = from_state_dict(checkpoint(), "ckpt")
    assert SourceMapping.of().apply(raw) is raw


def test_two_names_mapped_to_one_are_refused() -> None:
    sd = {"module.w": torch.zeros(2), "w": torch.ones(2)}
    with pytest.raises(SourceError) as e:
        SourceMapping.of(strip_prefix="module.").apply(from_state_dict(sd, "ckpt"))
    assert str(e.value) == (
        "ckpt: the name map maps both 'module.w' and 'w' to 'w': exclude one of them or "
        "rename it elsewhere"
    )


def test_cast_applies_to_floats_only_and_meta_says_so(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(checkpoint(), str(path))
    with open_source(path) as raw:
        src = SourceMapping.of(strip_prefix="module.", dtype="bf16").apply(raw)
        assert not src.stable  # a cast makes a new tensor per load
        ids = src.load("bert.embeddings.position_ids")
        w = src.load("bert.pooler.dense.weight")
        assert ids.dtype == torch.int64 and w.dtype == torch.bfloat16
        assert torch.equal(w, checkpoint()["module.bert.pooler.dense.weight"].bfloat16())
        assert src.meta("bert.pooler.dense.weight") == ("BF16", (4, 4))
        assert src.meta("bert.embeddings.position_ids") == ("I64", (1, 8))
        assert src.size("bert.pooler.dense.weight") == 4 * 4 * 2
        assert raw.meta("module.bert.pooler.dense.weight") == ("F32", (4, 4))


def test_a_cast_that_overflows_is_refused() -> None:
    sd = {"w": torch.tensor([1.0, 7e4, -1e5, float("inf")])}
    src = SourceMapping.of(dtype="fp16").apply(from_state_dict(sd, "ckpt"))
    with pytest.raises(SourceError) as e:
        src.load("w")
    assert str(e.value) == (
        "ckpt: casting 'w' from F32 to F16 turns 2 finite values into infinities (over F16's "
        "range); cast to another dtype or publish it uncast"
    )
    # bf16 has float32's range: the infinity that was there stays, nothing overflows.
    out = SourceMapping.of(dtype="bf16").apply(from_state_dict(sd, "ckpt")).load("w")
    assert codec.dtype_name(out.dtype) == "BF16" and int(torch.isinf(out).sum()) == 1


def test_cast_dtypes_and_rename_pairs() -> None:
    assert cast_dtype("BF16") is torch.bfloat16 and cast_dtype(torch.float16) is torch.float16
    assert cast_dtype(None) is None
    for bad in ("int8", torch.int8, "float8"):
        with pytest.raises(ConfigError) as e:
            cast_dtype(bad)
        assert str(e.value) == (
            f"dtype {bad!r} is not one a publish casts to; choose one of bf16, fp16, fp32"
        )
    assert rename_pairs(["a=b", "c.d=e.f"]) == {"a": "b", "c.d": "e.f"}
    for pairs, message in (
        (["a"], "--rename 'a': expected OLD=NEW"),
        (["=b"], "--rename '=b': expected OLD=NEW"),
        (["a=b", "a=c"], "--rename 'a' is given twice"),
    ):
        with pytest.raises(ConfigError) as e:
            rename_pairs(pairs)
        assert str(e.value) == message


def test_docstring_examples_run() -> None:
    failed, attempted = doctest.testmod(mapping, raise_on_error=False, verbose=False)
    assert attempted > 0 and failed == 0
