"""The bytes a version replaced, kept in host memory to put the version before it back.

Before the writer lock of an apply, ``save`` keeps what each live tensor
holds where the version will write: the words of a sparse patch's elements
(``patches.Scatter``: O(change)), or a copy of the whole tensor. Reading
live tensors outside the lock is safe: the agent is their only writer, and
readers only read. ``restore`` writes them back under the lock with one
``copy_`` (or one scatter) per tensor: no allocation and no Redis, so an
agent reverts while Redis is down.

Memory: one version's replaced bytes, within a budget (``HOTSWAP_REVERT_BYTES``);
a version over it keeps nothing and cannot be reverted (nor probed). The
copies of the version before are reused where a tensor of the same size is
replaced again (a fine-tuning loop rewrites every tensor each step), so
steady state faults in no fresh pages.

Pure: no Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hotswap import hostmem, patches

Source = torch.Tensor | patches.Scatter


@dataclass(frozen=True)
class Saved:
    """One live tensor's bytes before a version: a copy, or its patched elements' words."""

    live: torch.Tensor
    old: torch.Tensor | patches.Scatter

    @property
    def nbytes(self) -> int:
        if isinstance(self.old, patches.Scatter):
            return int(self.old.values.nbytes + self.old.index.nbytes)
        return self.old.numel() * self.old.element_size()


def needed(copies: Iterable[tuple[torch.Tensor, Source]]) -> int:
    """The host bytes ``save`` keeps for ``copies``."""
    total = 0
    for dst, src in copies:
        if isinstance(src, patches.Scatter):
            total += src.values.nbytes + src.index.nbytes
        else:
            total += dst.numel() * dst.element_size()
    return total


def save(
    copies: Sequence[tuple[torch.Tensor, Source]],
    budget: int | None,
    reuse: Mapping[int, torch.Tensor] | None = None,
) -> list[Saved] | None:
    """What ``copies`` (live tensor, what the apply writes) will overwrite, or None when it
    exceeds ``budget`` bytes (None: no limit). ``reuse``: earlier copies by the
    ``id`` of their live tensor, written over where the size matches.

    Example::

        saved = undo.save(copies, budget=None)
        copies.apply(pairs)
        undo.restore(saved)  # the live tensors hold what they held before
    """
    if budget is not None and needed(copies) > budget:
        return None
    out: list[Saved] = []
    with torch.no_grad():
        for dst, src in copies:
            if isinstance(src, patches.Scatter):
                out.append(Saved(dst, patches.Scatter.gather(dst, src.index)))
                continue
            kept = (reuse or {}).get(id(dst))
            if kept is None or kept.shape != dst.shape or kept.dtype != dst.dtype:
                kept = _fresh(dst)
            kept.copy_(dst)
            out.append(Saved(dst, kept))
    return out


def _fresh(like: torch.Tensor) -> torch.Tensor:
    """Host memory for a copy of ``like``. Large copies get mappings of their own, never
    lazily freed (``hostmem.anonymous``): the allocator's heap would keep a dropped
    copy's pages resident for good (glibc raises its mmap threshold after the first
    large free), so a version that replaced the whole model would leave the whole
    model's size resident after the next, smaller one."""
    nbytes = like.numel() * like.element_size()
    if nbytes < hostmem.ARENA_MIN_BYTES or like.is_complex():
        return torch.empty_like(like, device="cpu", memory_format=torch.contiguous_format)
    return hostmem.anonymous(nbytes).view(like.dtype).view(like.shape)


def copies_of(saved: Iterable[Saved]) -> dict[int, torch.Tensor]:
    """The whole-tensor copies of ``saved``, by the ``id`` of their live tensor (``reuse``)."""
    return {id(s.live): s.old for s in saved if isinstance(s.old, torch.Tensor)}


def restore(saved: Iterable[Saved]) -> None:
    """Write every saved tensor back in place. The caller holds the writer lock."""
    with torch.no_grad():
        for s in saved:
            if isinstance(s.old, patches.Scatter):
                s.old.into(s.live)
            else:
                s.live.copy_(s.old)
