"""Copies into live tensors: which (live, staged) pairs an apply writes, the apply itself
under the writer lock, and host-to-device copies of staged bytes on side streams.

On CUDA every copy runs on a side stream of its own: staging copies never wait on
the serving stream's kernels nor hold them up; only the apply, under the writer
lock, synchronizes with what readers queued. Elsewhere these are plain ``copy_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hotswap import patches
from hotswap.live import LiveModel

if TYPE_CHECKING:
    from hotswap.staging import Staged


def to_device(buf: torch.Tensor, host: torch.Tensor, side: dict[torch.device, Any]) -> None:
    """Copy ``host`` into device tensor ``buf`` on that device's side stream; returns once
    it landed (``host`` is a bounce buffer the next tensor reuses)."""
    if buf.device.type != "cuda":
        buf.copy_(host)
        return
    stream = side.get(buf.device)
    if stream is None:
        stream = side[buf.device] = torch.cuda.Stream(buf.device)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        buf.copy_(host, non_blocking=True)
    stream.synchronize()


class _Copier:
    """Copies onto one device: a side stream on CUDA, plain ``copy_`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = (
            torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            if device.type == "cuda"
            else None
        )

    def context(self) -> contextlib.AbstractContextManager[Any]:
        if self.stream is None:
            return contextlib.nullcontext()
        # Kernels the readers queued may still be reading the weights.
        torch.cuda.synchronize(self.device)
        return torch.cuda.stream(self.stream)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


Source = torch.Tensor | patches.Scatter


def pairs(
    staged: Staged, live: LiveModel, running: Mapping[str, str] | None = None
) -> list[tuple[torch.Tensor, Source]]:
    """(live tensor, staged tensor or its changed elements) per storage, tied names once.

    A patched tensor (``Staged.patches``) gives a ``patches.Scatter`` when it
    still describes the staged tensor, ``running`` (digest per live name,
    what runs now) holds the bytes it started from and the patch is small
    enough to be worth it (``Scatter.worth``); the whole tensor otherwise.
    """
    out: list[tuple[torch.Tensor, Source]] = []
    for name, new in staged.tensors.items():
        patch = staged.patches.get(name)
        if (
            patch is not None
            and patch.staged is new
            and running is not None
            and running.get(name) == patch.base
            and patches.Scatter.worth(patch)
        ):
            out.append((live.tensors[name], patches.Scatter.of(patch)))
        else:
            out.append((live.tensors[name], new))
    return out


def patched(copies: list[tuple[torch.Tensor, Source]]) -> int:
    """How many of ``copies`` write only changed elements."""
    return sum(isinstance(src, patches.Scatter) for _, src in copies)


def apply(copies: list[tuple[torch.Tensor, Source]]) -> None:
    """Copy every staged tensor into its live tensor in place (a ``Scatter``: only its
    elements); returns when all landed.

    The caller holds the writer lock: readers must not run while this runs.
    """
    by_device: dict[torch.device, list[tuple[torch.Tensor, Source]]] = {}
    for dst, src in copies:
        by_device.setdefault(dst.device, []).append((dst, src))
    copiers = [(_Copier(device), items) for device, items in by_device.items()]
    with torch.no_grad():
        for copier, items in copiers:
            with copier.context():
                for dst, src in items:
                    if isinstance(src, patches.Scatter):
                        src.into(dst)
                    else:
                        dst.copy_(src, non_blocking=True)
        for copier, _ in copiers:
            copier.finish()
