"""A checkpoint as it will be published: its names mapped and its floats cast.

``SourceMapping`` holds a ``hotswap.names.NameMap`` (exclude globs, prefixes to
strip, a rename) and an optional dtype; ``apply`` wraps a ``TensorSource``
so that everything after it (the checks before upload, hashing, upload)
sees only the published names and the cast bytes: the digest in the
manifest is over the bytes as published, which is what agents check.

Only ``F64``, ``F32``, ``F16`` and ``BF16`` tensors are cast; integers,
booleans and 8-bit floats keep their dtype (a ``position_ids`` buffer stays
``I64``). A cast that turns a finite value into an infinity (a ``F32``
value over ``F16``'s range) is refused: it would publish a broken tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hotswap import codec
from hotswap.errors import ConfigError, SourceError
from hotswap.names import NameMap, Rename
from publisher.sources import Meta, TensorSource

CASTS: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
"""The dtypes a publish may cast floating-point tensors to, by their CLI name."""

CASTABLE = {"F64", "F32", "F16", "BF16"}
"""Wire dtypes a cast applies to; every other dtype is published as it is."""


def cast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype for ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype).

    Raises:
        ConfigError: any other value.

    Example:
        >>> cast_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in CASTS.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in CASTS:
        return CASTS[dtype.lower()]
    choices = ", ".join(CASTS)
    raise ConfigError(f"dtype {dtype!r} is not one a publish casts to; choose one of {choices}")


@dataclass(frozen=True)
class SourceMapping:
    """What a publish does to a checkpoint's names and dtypes before anything is read.

    Example:
        >>> t = SourceMapping.of(exclude=["cls.*"], strip_prefix="bert.", dtype="bf16")
        >>> t.names.map("bert.pooler.dense.bias"), t.dtype
        ('pooler.dense.bias', torch.bfloat16)
    """

    names: NameMap = field(default_factory=NameMap)
    dtype: torch.dtype | None = None

    @classmethod
    def of(
        cls,
        exclude: Sequence[str] = (),
        rename: Rename | None = None,
        strip_prefix: str | Sequence[str] = (),
        dtype: str | torch.dtype | None = None,
    ) -> SourceMapping:
        """A transform from ``publish``'s keyword arguments (checked here).

        Raises:
            ConfigError: an empty glob or prefix, a rename that is neither a
                mapping nor a callable, or a dtype not in ``CASTS``.
        """
        return cls(NameMap(exclude, rename, strip_prefix), cast_dtype(dtype))

    @property
    def identity(self) -> bool:
        """True when the checkpoint is published as it is."""
        return self.names.identity and self.dtype is None

    def apply(self, src: TensorSource) -> TensorSource:
        """``src`` seen through this transform (``apply``)."""
        return apply(src, self)

    def published_dtype(self, dtype: str) -> str:
        """The wire dtype a tensor of wire dtype ``dtype`` is published as."""
        if self.dtype is None or dtype not in CASTABLE:
            return dtype
        return codec.dtype_name(self.dtype)


def apply(src: TensorSource, transform: SourceMapping) -> TensorSource:
    """``src`` seen through ``transform``: published names, cast tensors.

    The result reads through ``src`` and does not own it: close ``src``.

    Raises:
        SourceError: the map sends two names to one, or to an empty name.
    """
    if transform.identity:
        return src
    try:
        published = transform.names.apply(src.names)
    except ConfigError as e:
        raise SourceError(f"{src.where}: {e}") from e
    origin = {new: old for old, new in published.items()}
    cast = _Cast(src, transform)

    def meta(name: str) -> Meta:
        dtype, shape = src.meta(origin[name])
        return transform.published_dtype(dtype), shape

    def size(name: str) -> int:
        dtype, shape = meta(name)
        return math.prod(shape) * codec.itemsize(dtype)

    return TensorSource(
        src.where,
        list(published.values()),
        lambda name: cast.load(name, origin[name]),
        size=size,
        meta=meta,
        # A cast makes a new tensor per load: its address says nothing about ties.
        stable=src.stable and transform.dtype is None,
    )


class _Cast:
    """Loads a tensor by its source name and casts it, checking each cast once."""

    def __init__(self, src: TensorSource, transform: SourceMapping) -> None:
        self._src = src
        self._to = transform.dtype
        self._checked: set[str] = set()

    def load(self, name: str, source_name: str) -> torch.Tensor:
        tensor = self._src.load(source_name)
        if self._to is None or codec.dtype_name(tensor.dtype) not in CASTABLE:
            return tensor
        out = tensor.to(self._to)
        if name not in self._checked:
            _check_cast(tensor, out, source_name, self._src.where)
            self._checked.add(name)
        return out


def _check_cast(before: torch.Tensor, after: torch.Tensor, name: str, where: str) -> None:
    """SourceError if the cast turned finite values into infinities."""
    if after is before or bool(torch.isfinite(after).all()):
        return
    overflowed = int((torch.isfinite(before) & ~torch.isfinite(after)).sum())
    if overflowed:
        to = codec.dtype_name(after.dtype)
        raise SourceError(
            f"{where}: casting {name!r} from {codec.dtype_name(before.dtype)} to {to} turns "
            f"{overflowed} finite values into infinities (over {to}'s range); cast to "
            "another dtype or publish it uncast"
        )


def rename_pairs(pairs: Sequence[str]) -> Mapping[str, str]:
    """``["OLD=NEW", ...]`` (``--rename``) as a mapping.

    Raises:
        ConfigError: a pair without ``=``, with an empty side, or an OLD given twice.

    Example:
        >>> rename_pairs(["pooler.dense.weight=pool.weight"])
        {'pooler.dense.weight': 'pool.weight'}
    """
    out: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename {pair!r}: expected OLD=NEW")
        if old in out:
            raise ConfigError(f"--rename {old!r} is given twice")
        out[old] = new
    return out
