"""Planning, staging and in-place apply (the CUDA code paths, run on CPU)."""

from __future__ import annotations

from typing import cast

import pytest
import redis
import torch
from agent_support import Ten, commit_raw, entry_for

from hotswap import codec, keys
from hotswap import manifest as mf
from hotswap.staging import LiveModel, Staging, apply, fetch, pairs, plan, prepare, typed
from hotswap.store import Store
from hotswap.validate import Policy


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.out = torch.nn.Linear(4, 8, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("empty_a", torch.zeros(0))
        self.register_buffer("empty_b", torch.zeros(0))


def manifest_of(state: dict[str, torch.Tensor], version: int = 1) -> mf.Manifest:
    return mf.Manifest(
        model="m",
        version=version,
        parent=None,
        lineage="l" * 32,
        tensors=tuple(entry_for(k, v) for k, v in state.items()),
    )


def test_live_model_finds_ties_but_not_empty_tensors() -> None:
    live = LiveModel(Tied())
    assert live.ties() == [["emb.weight", "out.weight"]]
    assert live.canonical["out.weight"] == "emb.weight"
    assert live.canonical["empty_b"] == "empty_b"
    d = live.digests()
    assert d["emb.weight"] == d["out.weight"]
    assert d["emb.weight"] == codec.digest(codec.as_bytes(live.tensors["emb.weight"]))


def test_live_model_accepts_a_mapping() -> None:
    t = torch.ones(3)
    live = LiveModel({"a": t, "b": t[:2]})
    assert live.tensors["a"] is t
    assert live.ties() == []  # overlapping but different views are not tied


def test_plan_fetches_only_changed_tensors_once_per_storage() -> None:
    model = Tied()
    live = LiveModel(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["emb.weight"] = state["emb.weight"] + 1
    state["out.weight"] = state["emb.weight"]
    p = plan(manifest_of(state), live, live.digests(), set())
    assert [e.name for e in p.fetch] == ["emb.weight"]
    assert sorted(p.changed) == ["emb.weight", "out.weight"]
    assert p.nbytes == 8 * 4 * 4
    nothing = plan(manifest_of(dict(model.state_dict())), live, live.digests(), set())
    assert nothing.fetch == [] and nothing.changed == {}


def test_typed_view_shares_the_buffer() -> None:
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    e = entry_for("t", t)
    buf = torch.empty(e.nbytes, dtype=torch.uint8)
    view = typed(buf, e)
    view.copy_(t)
    assert view.data_ptr() == buf.data_ptr()
    assert bytes(buf.numpy()) == bytes(codec.as_bytes(t))
    scalar = typed(
        torch.empty(8, dtype=torch.uint8), entry_for("s", torch.tensor(1.5, dtype=torch.float64))
    )
    assert scalar.shape == ()
    empty = typed(torch.empty(0, dtype=torch.uint8), entry_for("e", torch.zeros(0, 5)))
    assert empty.shape == (0, 5)


def test_apply_copies_in_place_into_strided_and_parameter_tensors() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 4))
    base = torch.zeros(4, 4)
    strided = base.t()  # live tensors need not be contiguous
    before = (p.data_ptr(), strided.data_ptr())
    new_p, new_s = torch.randn(4, 4), torch.randn(4, 4)
    apply([(p, new_p), (strided, new_s)])
    assert (p.data_ptr(), strided.data_ptr()) == before
    assert torch.equal(p.detach(), new_p) and torch.equal(strided, new_s)
    assert torch.equal(base, new_s.t())
    assert p.requires_grad and p.grad is None


@pytest.mark.parametrize("mode", ["auto", "pinned", "device"])
def test_fetch_stages_every_changed_tensor_exactly(store: Store, mode: Staging) -> None:
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 1.5 for k, v in model.state_dict().items()}
    state["scale"] = model.scale.clone()  # unchanged: not fetched
    v = commit_raw(store, state)
    m = store.manifest(v)
    staged, reasons = prepare(
        store,
        m,
        live,
        live.digests(),
        Policy(),
        mode=mode,
        where="model 'm' v1",
    )
    assert reasons == {}
    assert "scale" not in staged.tensors and len(staged.tensors) == 9
    assert staged.bytes_fetched == sum(t.nbytes for k, t in state.items() if k != "scale")
    for name, t in staged.tensors.items():
        assert torch.equal(t, state[name]) and t.device.type == "cpu"
    ptrs = {k: t.data_ptr() for k, t in model.state_dict().items()}
    apply(pairs(staged, live))
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == ptrs
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_fetch_names_every_corrupted_or_missing_tensor(store: Store, client: redis.Redis) -> None:
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 2 for k, v in model.state_dict().items()}
    v = commit_raw(store, state)
    m = store.manifest(v)
    by = m.by_name()
    bad, gone = by["layers.0.weight"], by["layers.2.bias"]
    first = keys.blob_key("hotswap", "m", bad.digest, bad.chunk_bytes, 0)
    raw = bytearray(cast(bytes, client.get(first)))
    raw[0] ^= 0xFF
    client.set(first, bytes(raw))
    client.delete(keys.blob_key("hotswap", "m", gone.digest, gone.chunk_bytes, 0))
    p = plan(m, live, live.digests(), set())
    staged = fetch(store, p, live, mode="auto", where="model 'm' v1")
    assert sorted(staged.failures) == ["layers.0.weight", "layers.2.bias"]
    assert staged.failures["layers.0.weight"][0].startswith(
        "model 'm' v1 tensor 'layers.0.weight': bytes hash to"
    )
    assert "chunk 0 of 1 is missing" in staged.failures["layers.2.bias"][0]
    assert "layers.0.weight" not in staged.tensors and len(staged.tensors) == 8
