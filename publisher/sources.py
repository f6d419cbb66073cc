"""Where a publish reads its tensors from, one tensor at a time.

A source is an in-memory state dict, a ``.safetensors`` file, a sharded
checkpoint folder (``*.index.json`` naming the shard of every tensor), a
``.pt``/``.pth``/``.bin`` state dict, or a folder holding exactly one of
these. Only regular files are opened (a FIFO would block the publish until
some writer came), and a file found inside a folder (by listing it or
through its index) must not be a symlink out of that folder unless the
caller asks to follow such links: whoever can write the folder could
otherwise publish any file the publisher can read. Files are opened
lazily: safetensors through ``safe_open`` (one tensor read at a time),
pickled checkpoints through ``torch.load(weights_only=True, mmap=True)`` so
nothing but tensors and plain containers can be unpickled and the storages
stay on disk until read.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hotswap import codec
from hotswap.errors import SourceError

SAFETENSORS = (".safetensors",)
PICKLED = (".pt", ".pth", ".bin")
INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024

Source = Mapping[str, torch.Tensor] | str | os.PathLike[str]

Meta = tuple[str, tuple[int, ...]]
"""A tensor's wire dtype name and shape."""


class TensorSource:
    """Names, then tensors loaded on demand; ``close()`` releases open files.

    ``stable`` says every tensor stays alive while the source is open, so two
    names over the same memory are the same bytes (tied weights). A source
    that makes a fresh tensor per ``load`` is not stable: freed memory may be
    reused at the same address by the next tensor.
    """

    def __init__(
        self,
        where: str,
        names: list[str],
        load: Callable[[str], torch.Tensor],
        *,
        stack: ExitStack | None = None,
        size: Callable[[str], int] | None = None,
        meta: Callable[[str], Meta] | None = None,
        stable: bool = False,
    ) -> None:
        self.where = where
        self.stable = stable
        self.names = names
        self._load = load
        self._size = size
        self._meta = meta
        self._stack = stack or ExitStack()

    def size(self, name: str) -> int:
        """Bytes of tensor ``name``, without reading it where the format allows."""
        if self._size is not None:
            try:
                return self._size(name)
            except Exception:  # noqa: S110 - a size is only for progress; load() reports errors
                pass
        return int(self.load(name).nbytes)

    def meta(self, name: str) -> Meta:
        """``(dtype name, shape)`` of tensor ``name``, without reading its bytes where
        the format allows (a safetensors header)."""
        if self._meta is not None:
            try:
                return self._meta(name)
            except Exception:  # noqa: S110 - load() below names what is wrong
                pass
        t = self.load(name)
        return codec.dtype_name(t.dtype), tuple(int(d) for d in t.shape)

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name``, checked to be publishable."""
        try:
            value = self._load(name)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.where}: cannot read tensor {name!r}: {_first_line(e)}") from e
        return check_tensor(value, name, self.where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise SourceError(f"{where}: tensor name {name!r:.80} must be a non-empty string")
    return name


def check_tensor(value: object, name: str, where: str) -> torch.Tensor:
    """``value`` if it is a dense, materialised tensor, else SourceError naming it."""
    if not isinstance(value, torch.Tensor):
        raise SourceError(
            f"{where}: {name!r} is of type {type(value).__name__}, not a tensor; "
            "publish a flat state dict of tensors (model.state_dict())"
        )
    if value.layout != torch.strided:
        raise SourceError(
            f"{where}: tensor {name!r} has layout {value.layout}; publish dense tensors "
            "(call .to_dense())"
        )
    if value.is_quantized or value.device.type == "meta":
        raise SourceError(
            f"{where}: tensor {name!r} is {'quantized' if value.is_quantized else 'on meta'}; "
            "publish real, unquantized values"
        )
    return value


def open_source(source: Source, *, follow_symlinks: bool = False) -> TensorSource:
    """A TensorSource for a state dict, a checkpoint file or a checkpoint folder.

    Args:
        source: a state dict, or the path of a checkpoint file or folder.
        follow_symlinks: read files of a folder that are symlinks to a file
            outside it (as a Hugging Face cache snapshot is made of).

    Raises:
        SourceError: not readable, not a regular file, a symlink out of its
            folder (unless ``follow_symlinks``), or not a checkpoint.
    """
    if isinstance(source, Mapping):
        return from_state_dict(source, "state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise SourceError(
            f"cannot publish an object of type {type(source).__name__}: pass a state dict, "
            "a .safetensors/.pt/.bin path or a checkpoint folder"
        )
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir():
        return _from_folder(path, follow_symlinks)
    _check_regular(path, str(path))
    return _from_file(path, follow_symlinks)


def _check_regular(path: Path, what: str) -> None:
    """SourceError unless ``path`` is a regular file (checked before anything opens it)."""
    if not path.is_file():
        raise SourceError(
            f"{what}: not a regular file (a FIFO, device or socket); publish a checkpoint file"
        )


def _check_inside(path: Path, folder: Path, what: str, follow_symlinks: bool) -> None:
    """SourceError if ``path`` is a symlink that leads out of ``folder`` (unless allowed)."""
    if follow_symlinks or not path.is_symlink():
        return
    target, home = path.resolve(), folder.resolve()
    if not target.is_relative_to(home):
        raise SourceError(
            f"{what} is a symlink to {target}, outside {folder}; "
            "pass follow_symlinks=True (--follow-symlinks) to publish it anyway"
        )


def from_state_dict(state: Mapping[Any, Any], where: str) -> TensorSource:
    # Hold one reference per name: a lazy mapping may build a fresh tensor per
    # lookup, and only tensors kept alive have addresses that identify them.
    tensors = {check_name(name, where): state[name] for name in state}
    for name, value in tensors.items():
        check_tensor(value, name, where)
    if not tensors:
        raise SourceError(f"{where} holds no tensors")
    return TensorSource(where, sorted(tensors), tensors.__getitem__, stable=True)


def _from_file(path: Path, follow_symlinks: bool) -> TensorSource:
    suffix = path.suffix.lower()
    if path.name.endswith(INDEX_SUFFIX):
        return _from_index(path, follow_symlinks)
    if suffix in SAFETENSORS:
        return _from_safetensors({path: None})
    if suffix in PICKLED:
        return _from_pickled(path)
    raise SourceError(
        f"{path}: not a checkpoint (expected .safetensors, .pt, .pth, .bin, "
        "a *.index.json or a folder of these)"
    )


def _from_folder(folder: Path, follow_symlinks: bool) -> TensorSource:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        _check_regular(indexes[0], str(indexes[0]))
        _check_inside(indexes[0], folder, str(indexes[0]), follow_symlinks)
        return _from_index(indexes[0], follow_symlinks)
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise SourceError(f"{folder}: holds several checkpoint indexes ({names}); name one")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SAFETENSORS + PICKLED
    )
    if not files:
        raise SourceError(
            f"{folder}: no checkpoint inside (expected .safetensors, .pt, .pth, .bin "
            "or a *.index.json)"
        )
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:5])
        raise SourceError(
            f"{folder}: holds {len(files)} checkpoint files ({names}) and no index; "
            "name the file to publish"
        )
    _check_inside(files[0], folder, str(files[0]), follow_symlinks)
    return _from_file(files[0], follow_symlinks)


def _from_index(index: Path, follow_symlinks: bool) -> TensorSource:
    """A sharded checkpoint: ``weight_map`` maps every tensor to its shard file."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise SourceError(f"{index}: over {MAX_INDEX_BYTES} bytes, not a checkpoint index")
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{index}: not a readable checkpoint index: {_first_line(e)}") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f'{index}: has no "weight_map" of tensor names to shard files')
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            # Only plain file names next to the index: never a path elsewhere.
            raise SourceError(f"{index}: shard {shard!r} of tensor {name!r} is not a file name")
        shards.setdefault(index.parent / shard, []).append(check_name(name, str(index)))
    for shard in shards:
        what = f"{index}: shard {shard.name}"
        if not shard.exists():
            raise SourceError(f"{what} is missing")
        if not shard.is_file():
            raise SourceError(f"{what} is not a regular file (a FIFO, device or socket)")
        _check_inside(shard, index.parent, what, follow_symlinks)
    suffixes = {s.suffix.lower() for s in shards}
    if suffixes <= set(SAFETENSORS):
        return _from_safetensors(dict(shards), where=str(index))
    if suffixes <= set(PICKLED):
        return _from_pickled_shards(index, shards)
    raise SourceError(f"{index}: shards must all be .safetensors or all .bin/.pt")


def _from_safetensors(
    shards: dict[Path, list[str] | None], where: str | None = None
) -> TensorSource:
    stack = ExitStack()
    owner: dict[str, Any] = {}
    try:
        for path, expected in shards.items():
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:
                raise SourceError(f"{path}: not a valid safetensors file: {_first_line(e)}") from e
            present = list(handle.keys())
            for name in expected if expected is not None else present:
                if name not in present:
                    raise SourceError(f"{where}: tensor {name!r} is not in shard {path.name}")
                if name in owner:
                    raise SourceError(f"{where or path}: tensor {name!r} appears twice")
                owner[check_name(name, str(path))] = handle
    except BaseException:
        stack.close()
        raise
    label = where or str(next(iter(shards)))
    if not owner:
        stack.close()
        raise SourceError(f"{label}: holds no tensors")

    def meta(name: str) -> Meta:
        piece = owner[name].get_slice(name)
        return str(piece.get_dtype()), tuple(int(d) for d in piece.get_shape())

    def size(name: str) -> int:
        dtype, shape = meta(name)
        return int(math.prod(shape)) * codec.itemsize(dtype)

    return TensorSource(
        label,
        sorted(owner),
        lambda name: owner[name].get_tensor(name),
        stack=stack,
        size=size,
        meta=meta,
    )


def load_pickled(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.pt``/``.bin``, refusing anything but tensors."""
    try:
        with warnings.catch_warnings():
            # torch warns (on stderr) about what it then refuses, such as a raw
            # archive's protocol; the SourceError below says it in one line.
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")
            data = _torch_load(path)
    except Exception as e:
        raise SourceError(
            f"{path}: not a loadable tensor checkpoint (torch.load with weights_only=True "
            f"refused it: {_first_line(e)})"
        ) from e
    if not isinstance(data, dict):
        raise SourceError(
            f"{path}: holds an object of type {type(data).__name__}, not a dict of tensors; "
            "save model.state_dict()"
        )
    for name, value in data.items():
        if isinstance(value, Mapping):
            raise SourceError(
                f"{path}: entry {name!r} is a nested dict, not a tensor; this looks like a "
                "training checkpoint: save its model state dict (e.g. ckpt['model']) alone"
            )
        check_tensor(value, check_name(name, str(path)), str(path))
    if not data:
        raise SourceError(f"{path}: holds no tensors")
    return data


def _torch_load(path: Path) -> Any:
    try:
        # mmap leaves the storages on disk until a tensor is read.
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        # Legacy (pre-zip) checkpoints cannot be memory-mapped.
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _from_pickled(path: Path) -> TensorSource:
    data = load_pickled(path)
    return TensorSource(str(path), sorted(data), data.__getitem__, stable=True)


def _from_pickled_shards(index: Path, shards: dict[Path, list[str]]) -> TensorSource:
    # Shards are loaded on first use and dropped from the cache when the next
    # one is needed, so only one shard's tensors are resident at a time.
    owner = {name: shard for shard, names in shards.items() for name in names}
    current: dict[Path, dict[str, torch.Tensor]] = {}

    def load(name: str) -> torch.Tensor:
        shard = owner[name]
        if shard not in current:
            current.clear()
            current[shard] = load_pickled(shard)
        tensors = current[shard]
        if name not in tensors:
            raise SourceError(f"{index}: tensor {name!r} is not in shard {shard.name}")
        return tensors[name]

    # Sort by shard so each shard is loaded once during a pass.
    names = sorted(owner, key=lambda n: (str(owner[n]), n))
    return TensorSource(str(index), names, load)
