"""Sparse patches of live tensors: where a delta changed them, and scattering just that.

A tensor reconstructed from the bytes an agent runs through sparse delta
frames only (``encodings.SPARSE_ZSTD``: an RL step in bfloat16) differs from
them in a few words, and the decode knows which: everywhere else it copied
the live bytes. ``Rebuild`` (``hotswap.reconstruct``) joins those words into
a ``Where`` once the result's digest matched the signed manifest; ``staging``
keeps it as a ``Patch`` beside the staged tensor, so that validation
(``hotswap.patchcheck``) reads only the changed elements and the writer lock
covers a ``Scatter`` of them into the live tensor, not a copy of all of it.

The staged tensor is still built and hashed whole: the manifest signs
BLAKE3 of the whole tensor. A scatter is exact only while the live tensor
holds the bytes the delta started from (``Patch.base``): the agent is their
only writer, and ``staging.pairs`` copies the whole staged tensor whenever
what runs is not that digest.

Pure: no Redis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from hotswap import codec
from hotswap.encodings import Patched

# Dtypes whose elements a patch indexes one for one (word width = element
# size) and whose checks patchcheck derives: plain IEEE-like floats.
PATCHABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Where:
    """The words of a whole tensor a route's patches wrote: ``width`` bytes each, rising."""

    width: int
    index: npt.NDArray[np.int64]


def union(got: Sequence[Patched | None]) -> Patched | None:
    """Where one chunk's links wrote, together; None when any link was not a patch.

    Example::

        union([Patched(2, np.array([1, 5], np.uint64)), Patched(2, np.array([5, 7], np.uint64))])
        # Patched(width=2, at=array([1, 5, 7], dtype=uint64))
    """
    if not got or any(p is None for p in got):
        return None
    first = got[0]
    assert first is not None
    if len(got) == 1:
        return first
    if any(p is not None and p.width != first.width for p in got):
        return None
    at = np.unique(np.concatenate([p.at for p in got if p is not None]))
    return Patched(first.width, at)


def joined(wrote: Mapping[int, Patched | None], spans: Sequence[tuple[int, int]]) -> Where | None:
    """Every chunk's patch as word indices into the whole tensor; None unless every chunk
    was patched, all with one width that divides every chunk's start."""
    if len(wrote) != len(spans) or not spans:
        return None
    parts: list[npt.NDArray[np.int64]] = []
    width = 0
    for i, (start, _end) in enumerate(spans):
        p = wrote.get(i)
        if p is None or (width and p.width != width) or start % p.width:
            return None
        width = p.width
        parts.append(p.at.astype(np.int64) + start // width)
    return Where(width, np.concatenate(parts))


@dataclass(frozen=True)
class Patch:
    """A staged tensor's patch: it equals the live bytes of digest ``base`` but at ``index``.

    ``staged`` is the staged tensor it describes: a cast or transform that
    replaces the staged tensor leaves the patch unused.
    """

    base: str
    index: torch.Tensor  # int64 element indices into the flat tensor
    staged: torch.Tensor


def usable(where: Where, live: torch.Tensor, dtype: str, nbytes: int) -> bool:
    """Whether a patch found for ``live`` can stand for its staged tensor: a dense CPU
    float tensor of the entry's dtype, indexed element by element."""
    return (
        live.device.type == "cpu"
        and live.dtype in PATCHABLE
        and codec.dtype_name(live.dtype) == dtype
        and live.is_contiguous()
        and live.itemsize == where.width
        and live.numel() * live.itemsize == nbytes
        and not live.is_conj()
        and not live.is_neg()
    )


def make(base: str, where: Where, staged: torch.Tensor) -> Patch:
    """The ``Patch`` of a staged tensor from where its route wrote."""
    return Patch(base, torch.from_numpy(where.index), staged)


@dataclass(frozen=True)
class Scatter:
    """New values for a few elements of a live tensor: what the writer lock writes."""

    index: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, patch: Patch) -> Scatter:
        """The changed elements' new values, gathered from the staged tensor (before the lock)."""
        return cls(patch.index, patch.staged.reshape(-1).index_select(0, patch.index))

    def into(self, live: torch.Tensor) -> None:
        """Write the values into ``live`` (dense, as ``usable`` requires) in place."""
        live.view(-1).index_copy_(0, self.index, self.values)
