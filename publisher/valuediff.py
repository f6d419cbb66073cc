"""How far apart two versions' tensors are in value: ‖new - old‖ and max |new - old|.

The manifests hold each tensor's norm, not its values, so ``hotswap diff``
shows the change of norm by default; ``--values`` reads both versions'
bytes (``export.tensor_bytes``: full blobs or deltas, checked against their
digests, read-only) and computes the distance in float64, one tensor pair in
memory at a time. Imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hotswap import codec
from hotswap.candidates import History
from hotswap.manifest import Manifest
from hotswap.store import Store
from publisher import upkeep
from publisher.export import tensor_bytes

# dtypes whose values torch cannot subtract: the distance is not computed.
_NO_ARITHMETIC = ("F4_E2M1_X2", "F8_E8M0")


@dataclass(frozen=True)
class Distance:
    """‖new - old‖ (L2) and max |new - old| of one tensor; None where not computed."""

    norm: float | None
    max_abs: float | None


def distances(
    store: Store, a: Manifest, b: Manifest, names: Sequence[str], keys: Sequence[bytes] = ()
) -> dict[str, Distance]:
    """The distance between ``a``'s and ``b``'s tensor for each of ``names`` (both hold
    them). A pair of other shapes or dtypes, or a dtype without arithmetic, gets
    ``Distance(None, None)``."""
    old, new = a.by_name(), b.by_name()
    history = {m.version: History(store, m, upkeep.newer_manifests(store, m, keys)) for m in (a, b)}
    out: dict[str, Distance] = {}
    for name in names:
        x, y = old[name], new[name]
        if (x.dtype, x.shape) != (y.dtype, y.shape) or x.dtype in _NO_ARITHMETIC:
            out[name] = Distance(None, None)
            continue
        before = _values(store, a, name, history[a.version])
        after = _values(store, b, name, history[b.version])
        out[name] = between(before, after)
    return out


def between(before: torch.Tensor, after: torch.Tensor) -> Distance:
    """‖after - before‖ and max |after - before|, in float64 (complex128 for complex).

    Example:
        >>> between(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 6.0]))
        Distance(norm=5.0, max_abs=4.0)
    """
    wide = torch.complex128 if before.is_complex() else torch.float64
    d = after.to(wide) - before.to(wide)
    if d.numel() == 0:
        return Distance(0.0, 0.0)
    size = d.abs()
    return Distance(math.sqrt(float((size * size).sum())), float(size.max()))


def _values(store: Store, m: Manifest, name: str, history: History) -> torch.Tensor:
    e = m.by_name()[name]
    where = f"model {store.model!r} v{m.version}"
    return codec.from_bytes(tensor_bytes(store, m, e, history, where), e.dtype, e.shape)
