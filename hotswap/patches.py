"""Sparse patches of live tensors: where a delta changed them, and scattering just that.

A tensor reconstructed from the bytes an agent runs through sparse delta
frames only (``encodings.SPARSE_ZSTD``: an RL step in bfloat16) differs from
them in a few words, and the decode knows which: everywhere else it copied
the live bytes. ``Rebuild`` (``hotswap.reconstruct``) reads those words
before and after (a ``Piece`` a chunk, while the chunk is in cache: gathered
later from the whole tensors, scattered words cost about what a pass over
them does) and joins them into a ``Where`` once the result's digest matched
the signed manifest; ``staging`` keeps it as a ``Patch`` beside the staged
tensor, so that validation (``hotswap.patchcheck``) reads only the changed
elements and the writer lock covers a ``Scatter`` of them into the live
tensor, not a copy of all of it.

The staged tensor is still built and hashed whole: the manifest signs
BLAKE3 of the whole tensor. A scatter is exact only while the live tensor
holds the bytes the delta started from (``Patch.base``): the agent is their
only writer, and ``copies.pairs`` copies the whole staged tensor whenever
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
# A patch of more than this fraction of a tensor's elements is applied by a
# whole copy: past it the scattered stores (a cache miss each, not a stream)
# cost more than copying everything (docs/performance.md, "Sparse patches").
SCATTER_MAX_FRACTION = 1 / 16


_SIGNED: dict[int, type[np.signedinteger]] = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass(frozen=True)
class Piece:
    """One chunk's patched words: rising indices in the chunk, the words before and after."""

    width: int
    at: npt.NDArray[np.uint64]
    old: npt.NDArray[np.signedinteger]
    new: npt.NDArray[np.signedinteger]


@dataclass(frozen=True)
class Where:
    """The words of a whole tensor a route's patches wrote (``width`` bytes each, rising
    indices into the whole tensor), and what they held before and after."""

    width: int
    index: npt.NDArray[np.int64]
    old: npt.NDArray[np.signedinteger]
    new: npt.NDArray[np.signedinteger]


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


def piece(patched: Patched | None, base: memoryview, chunk: memoryview) -> Piece | None:
    """The words ``patched`` names in ``base`` (before) and ``chunk`` (after its links)."""
    if patched is None:
        return None
    words = _SIGNED[patched.width]
    at = patched.at
    before = np.frombuffer(base, dtype=words)[at]
    after = np.frombuffer(chunk, dtype=words)[at]
    return Piece(patched.width, at, before, after)


def joined(wrote: Mapping[int, Piece | None], spans: Sequence[tuple[int, int]]) -> Where | None:
    """Every chunk's piece joined, indices into the whole tensor; None unless every chunk
    was patched, all with one width that divides every chunk's start."""
    if len(wrote) != len(spans) or not spans:
        return None
    at: list[npt.NDArray[np.int64]] = []
    old: list[npt.NDArray[np.signedinteger]] = []
    new: list[npt.NDArray[np.signedinteger]] = []
    width = 0
    for i, (start, _end) in enumerate(spans):
        p = wrote.get(i)
        if p is None or (width and p.width != width) or start % p.width:
            return None
        width = p.width
        at.append(p.at.astype(np.int64) + start // width)
        old.append(p.old)
        new.append(p.new)
    return Where(width, np.concatenate(at), np.concatenate(old), np.concatenate(new))


@dataclass(frozen=True)
class Patch:
    """A staged tensor's patch: it equals the live bytes of digest ``base`` but at
    ``index`` (element indices into the flat tensor), where they go from ``old`` to
    ``new`` (of the tensor's dtype).

    ``staged`` is the staged tensor it describes: a cast or transform that
    replaces the staged tensor leaves the patch unused.
    """

    base: str
    index: npt.NDArray[np.int64]
    old: torch.Tensor
    new: torch.Tensor
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

    def typed(words: npt.NDArray[np.signedinteger]) -> torch.Tensor:
        return torch.from_numpy(words).view(staged.dtype)

    return Patch(base, where.index, typed(where.old), typed(where.new), staged)


@dataclass(frozen=True)
class Scatter:
    """New words for a few elements of a live tensor: what the writer lock writes."""

    index: npt.NDArray[np.int64]
    values: npt.NDArray[np.signedinteger]

    @staticmethod
    def worth(patch: Patch) -> bool:
        """Whether scattering ``patch`` beats copying its tensor whole."""
        return patch.index.size <= SCATTER_MAX_FRACTION * patch.staged.numel()

    @classmethod
    def of(cls, patch: Patch) -> Scatter:
        """The changed elements' new values as words."""
        return cls(patch.index, patch.new.view(_TORCH_SIGNED[patch.new.itemsize]).numpy())

    @classmethod
    def gather(cls, live: torch.Tensor, index: npt.NDArray[np.int64]) -> Scatter:
        """What ``live`` holds at ``index`` now: the scatter that puts it back."""
        words = live.detach().view(-1).view(_TORCH_SIGNED[live.itemsize]).numpy()
        return cls(index, words[index].copy())

    def into(self, live: torch.Tensor) -> None:
        """Write the values into ``live`` (dense CPU, as ``usable`` requires) in place."""
        # numpy's indexed store: fewer steps an element than torch's index_copy_.
        words = live.detach().view(-1).view(_TORCH_SIGNED[live.itemsize]).numpy()
        words[self.index] = self.values


_TORCH_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
