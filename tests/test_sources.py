"""Checkpoint sources, without Redis: formats, folders, shards and hostile files."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotswap.errors import SourceError
from publisher.sources import load_pickled, open_source


def sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "b.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "count": torch.tensor([3], dtype=torch.int64),
    }


def read_all(source: object) -> dict[str, torch.Tensor]:
    with open_source(source) as src:  # type: ignore[arg-type]
        return {n: src.load(n).clone() for n in src.names}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_state_dict_source_is_sorted_and_checked() -> None:
    state = sd()
    with open_source(state) as src:
        assert src.names == sorted(state)
        assert src.load("a.bias") is state["a.bias"]
        assert src.size("b.weight") == 32


def test_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sd(), str(path))
    assert same(read_all(path), sd())
    with open_source(str(path)) as src:
        # Sizes come from the header, before any tensor is read.
        assert [src.size(n) for n in src.names] == [16, 128, 32, 8]


def test_sharded_safetensors_folder(tmp_path: Path) -> None:
    state = sd()
    names = sorted(state)
    save_file({n: state[n] for n in names[:2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: state[n] for n in names[2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {
        n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same(read_all(tmp_path), state)
    assert same(read_all(tmp_path / "model.safetensors.index.json"), state)


def test_sharded_pt_index(tmp_path: Path) -> None:
    state = sd()
    torch.save({"a.weight": state["a.weight"], "a.bias": state["a.bias"]}, tmp_path / "p1.bin")
    torch.save({"b.weight": state["b.weight"], "count": state["count"]}, tmp_path / "p2.bin")
    weight_map = {"a.weight": "p1.bin", "a.bias": "p1.bin", "b.weight": "p2.bin", "count": "p2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same(read_all(tmp_path), state)


def test_index_errors(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(
        SourceError,
        match=exact(f"{index}: shard '../evil.safetensors' of tensor 'x' is not a file name"),
    ):
        open_source(tmp_path)
    index.write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(SourceError, match=exact(f"{index}: shard gone.safetensors is missing")):
        open_source(index)
    index.write_text("{not json")
    with pytest.raises(
        SourceError,
        match=f"^{re.escape(str(index))}: not a readable checkpoint index: JSONDecodeError",
    ):
        open_source(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SourceError, match='has no "weight_map"'):
        open_source(index)


def test_shard_missing_a_named_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(
        SourceError, match=exact(f"{index}: tensor 'b' is not in shard s1.safetensors")
    ):
        open_source(tmp_path)


def test_pt_file_and_folder_holding_one(tmp_path: Path) -> None:
    torch.save(sd(), tmp_path / "m.pt")
    assert same(read_all(tmp_path / "m.pt"), sd())
    assert same(read_all(tmp_path), sd())


def test_legacy_pt_format(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save(sd(), path, _use_new_zipfile_serialization=False)
    assert same(read_all(path), sd())


def test_pt_keeps_shared_storage(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    torch.save({"embed": w, "head": w}, tmp_path / "tied.pt")
    with open_source(tmp_path / "tied.pt") as src:
        a, b = src.load("embed"), src.load("head")
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(SourceError, match=exact(f"{path}: no such file or directory")):
        open_source(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(
        SourceError,
        match=exact(
            f"{txt}: not a checkpoint (expected .safetensors, .pt, .pth, .bin, "
            "a *.index.json or a folder of these)"
        ),
    ):
        open_source(txt)
    fake = tmp_path / "fake.safetensors"
    fake.write_text("hello, not a safetensors file at all")
    with pytest.raises(
        SourceError, match=f"^{re.escape(str(fake))}: not a valid safetensors file: "
    ):
        open_source(fake)
    fake_pt = tmp_path / "fake.pt"
    fake_pt.write_text("hello")
    with pytest.raises(
        SourceError,
        match=f"^{re.escape(str(fake_pt))}: not a loadable tensor checkpoint "
        r"\(torch.load with weights_only=True refused it: ",
    ):
        open_source(fake_pt)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(
        SourceError,
        match=exact(
            f"{tmp_path}: no checkpoint inside "
            "(expected .safetensors, .pt, .pth, .bin or a *.index.json)"
        ),
    ):
        open_source(tmp_path)
    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(
        SourceError,
        match=exact(
            f"{tmp_path}: holds 2 checkpoint files (x.safetensors, y.safetensors) "
            "and no index; name the file to publish"
        ),
    ):
        open_source(tmp_path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            [torch.ones(1)],
            "holds an object of type list, not a dict of tensors; save model.state_dict()",
        ),
        (
            {"w": torch.ones(1), "epoch": 3},
            "'epoch' is of type int, not a tensor; "
            "publish a flat state dict of tensors (model.state_dict())",
        ),
        (
            {"model": {"w": torch.ones(1)}, "step": 1},
            "entry 'model' is a nested dict, not a tensor; this looks like a training checkpoint: "
            "save its model state dict (e.g. ckpt['model']) alone",
        ),
        ({}, "holds no tensors"),
    ],
)
def test_pt_that_is_not_a_flat_tensor_dict(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(SourceError, match=exact(f"{path}: {message}")):
        open_source(path)


class Exploit:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.reliability
@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_code_executing_pickle_is_refused_without_running(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.ones(2), "x": Exploit(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # Proof that the payload is live: plain pickle would run it.
    if fmt == "raw-pickle":
        pickle.loads(path.read_bytes())["x"].close()
        assert marker.exists()
        marker.unlink()
    with pytest.raises(
        SourceError, match=f"^{re.escape(str(path))}: not a loadable tensor checkpoint"
    ):
        open_source(path)
    assert not marker.exists()
    with pytest.raises(SourceError, match="weights_only=True refused it"):
        load_pickled(path)
    assert not marker.exists()


def test_state_dict_errors() -> None:
    with pytest.raises(
        SourceError,
        match=exact(
            "state dict: 'x' is of type str, not a tensor; "
            "publish a flat state dict of tensors (model.state_dict())"
        ),
    ):
        open_source({"x": "hello"})  # type: ignore[dict-item]
    with pytest.raises(SourceError, match=exact("state dict holds no tensors")):
        open_source({})
    with pytest.raises(
        SourceError, match=exact("state dict: tensor name 3 must be a non-empty string")
    ):
        open_source({3: torch.ones(1)})  # type: ignore[dict-item]
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(
        SourceError,
        match=exact(
            "state dict: tensor 's' has layout torch.sparse_coo; "
            "publish dense tensors (call .to_dense())"
        ),
    ):
        open_source({"s": sparse})
    with pytest.raises(
        SourceError,
        match=exact(
            "cannot publish an object of type int: pass a state dict, "
            "a .safetensors/.pt/.bin path or a checkpoint folder"
        ),
    ):
        open_source(3)  # type: ignore[arg-type]


@pytest.mark.reliability
def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer comes: publish hung.
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    message = f"{fifo}: not a regular file (a FIFO, device or socket); publish a checkpoint file"
    with pytest.raises(SourceError, match=exact(message)):
        open_source(fifo)
    # Found in a folder: as an index, or as a shard an index names.
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    os.mkfifo(index)
    with pytest.raises(SourceError, match=exact(message.replace(str(fifo), str(index)))):
        open_source(folder)
    index.unlink()
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    os.mkfifo(folder / "s1.safetensors")
    with pytest.raises(
        SourceError,
        match=exact(
            f"{index}: shard s1.safetensors is not a regular file (a FIFO, device or socket)"
        ),
    ):
        open_source(folder)


def sharded_with_a_shard_elsewhere(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A sharded checkpoint whose second shard is a symlink to a file outside its folder."""
    state = sd()
    names = sorted(state)
    folder, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    save_file({n: state[n] for n in names[:2]}, str(folder / "s1.safetensors"))
    save_file({n: state[n] for n in names[2:]}, str(elsewhere / "secret.safetensors"))
    (folder / "s2.safetensors").symlink_to(elsewhere / "secret.safetensors")
    weight_map = {n: "s1.safetensors" if i < 2 else "s2.safetensors" for i, n in enumerate(names)}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return folder, index, state


@pytest.mark.reliability
def test_a_shard_linked_out_of_its_folder_is_refused_unless_asked(tmp_path: Path) -> None:
    folder, index, state = sharded_with_a_shard_elsewhere(tmp_path)
    target = tmp_path / "elsewhere" / "secret.safetensors"
    message = (
        f"{index}: shard s2.safetensors is a symlink to {target}, outside {folder}; "
        "pass follow_symlinks=True (--follow-symlinks) to publish it anyway"
    )
    for source in (folder, index):
        with pytest.raises(SourceError, match=exact(message)):
            open_source(source)
        with open_source(source, follow_symlinks=True) as src:
            assert same({n: src.load(n).clone() for n in src.names}, state)
    # A link that stays inside the folder is no escape: followed as before.
    (folder / "s2.safetensors").unlink()
    (target).rename(folder / "real.safetensors")
    (folder / "s2.safetensors").symlink_to("real.safetensors")
    assert same(read_all(index), state)
    # The one checkpoint of a folder, found by listing it, is held to the same rule.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").symlink_to(folder / "s1.safetensors")
    with pytest.raises(SourceError, match=r"model\.safetensors is a symlink to .*, outside "):
        open_source(lone)
