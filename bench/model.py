"""The benchmark's state dict: a transformer-like stack of tensors of a chosen total size."""

from __future__ import annotations

import math

import torch

MiB = 1024 * 1024
LAYERS = 24
# Shares of the total: one large FFN matrix per layer (16 MiB each at 512 MiB),
# a smaller attention projection, two tiny norm vectors, and an embedding.
FFN_SHARE = 0.75
PROJ_SHARE = 0.1875
NORM_ELEMS = 1024


def layout(total_bytes: int, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, summing to about ``total_bytes``."""
    width = 1024

    def rows(nbytes: float) -> int:
        return max(1, int(nbytes // (width * itemsize)))

    ffn = rows(total_bytes * FFN_SHARE / LAYERS)
    proj = rows(total_bytes * PROJ_SHARE / LAYERS)
    out: list[tuple[str, tuple[int, ...]]] = []
    used = 0
    for i in range(LAYERS):
        for name, shape in (
            (f"layers.{i}.attn.proj.weight", (proj, width)),
            (f"layers.{i}.ffn.up.weight", (ffn, width)),
            (f"layers.{i}.norm.weight", (NORM_ELEMS,)),
            (f"layers.{i}.norm.bias", (NORM_ELEMS,)),
        ):
            out.append((name, shape))
            used += math.prod(shape) * itemsize
    embed = rows(max(total_bytes - used, width * itemsize))
    out.insert(0, ("embed.weight", (embed, width)))
    return out


def build(total_bytes: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible state dict (same seed, same bytes in every process)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in layout(total_bytes, dtype.itemsize):
        t = torch.empty(shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            # uniform_ is several times faster than normal_ and just as good here.
            t.uniform_(-0.05, 0.05, generator=gen)
        sd[name] = t.to(dtype)
    return sd


def nbytes(sd: dict[str, torch.Tensor], names: list[str] | None = None) -> int:
    keys = sd if names is None else names
    return sum(sd[n].numel() * sd[n].element_size() for n in keys)


def perturb(sd: dict[str, torch.Tensor], names: list[str]) -> None:
    """Change every value of ``names`` a little, never back to an earlier state.

    A positive offset keeps every version's bytes new (no blob from an earlier
    run can be reused) and each step's norm ratio near 1. The offset is a few
    ulps of 1.0 in the tensor's dtype, so that bfloat16 values move too.
    """
    with torch.no_grad():
        for n in names:
            t = sd[n]
            t.add_(2.0**-10 if t.element_size() >= 4 else 2.0**-6)


def delta_names(sd: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The tensors each delta scenario changes."""
    names = list(sd)
    one = "layers.0.ffn.up.weight"
    count = max(1, round(len(names) / 100))
    stride = max(1, len(names) // count)
    percent = [names[(len(names) // 2 + i * stride) % len(names)] for i in range(count)]
    return {"one": [one], "percent": percent}
