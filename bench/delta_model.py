"""The delta benchmark's model and the steps a training loop takes on it.

A 12-layer transformer-like stack (attention and MLP matrices, layer norms,
an embedding) of a chosen total size. Three kinds of step, as issue 14
describes them and ``bench.delta_codec`` measures them on one tensor:

* **RL step** (``RlModel``): float32 master weights take an Adam-like step
  and the served bfloat16 copy is rounded again; the step size is set so
  that a chosen fraction of bfloat16 elements change. The directions come
  from ``bench.delta_codec``'s generator.
* **fp32 fine-tune step**: every element times ``1 + 1e-4 N(0, 1)``.
* **random new weights**: every matrix drawn again (the norms are kept, so
  that agents' norm-ratio check passes as it would for a real checkpoint).
"""

from __future__ import annotations

import math

import torch

from bench.delta_codec import _adam_direction

LAYERS = 12
# Per layer: qkv (3d x d), out (d x d), up (4d x d), down (d x 4d) = 12 d^2;
# the embedding takes what is left (about 1/5 of the total).
MATRIX_SHARE = 0.8
Layout = list[tuple[str, tuple[int, ...]]]


def layout(total_bytes: int, itemsize: int) -> Layout:
    """(name, shape) of every tensor, summing to about ``total_bytes``."""
    params = total_bytes // itemsize
    width = max(64, round(math.sqrt(params * MATRIX_SHARE / (12 * LAYERS)) / 64) * 64)
    out: Layout = []
    for i in range(LAYERS):
        p = f"layers.{i}."
        out += [
            (p + "attn.qkv.weight", (3 * width, width)),
            (p + "attn.out.weight", (width, width)),
            (p + "ln1.weight", (width,)),
            (p + "ln1.bias", (width,)),
            (p + "mlp.up.weight", (4 * width, width)),
            (p + "mlp.down.weight", (width, 4 * width)),
            (p + "ln2.weight", (width,)),
            (p + "ln2.bias", (width,)),
        ]
    used = sum(math.prod(s) for _, s in out)
    out.insert(0, ("embed.weight", (max(1, (params - used) // width), width)))
    return out


def nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def init(shapes: Layout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 weights: N(0, 0.02) matrices, norm weights 1, norm biases 0."""
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("ln1.weight") or name.endswith("ln2.weight"):
            sd[name] = torch.ones(shape)
        elif len(shape) == 1:
            sd[name] = torch.zeros(shape)
        else:
            sd[name] = torch.randn(shape, generator=gen) * 0.02
    return sd


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of elements whose bytes differ between two state dicts of one layout."""
    differ = total = 0
    for name, a in before.items():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differ += int((a.view(width) != after[name].view(width)).sum())
        total += a.numel()
    return differ / total


class RlModel:
    """float32 master weights and the bfloat16 copy a server runs (``served``)."""

    def __init__(self, total_bytes: int, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.master = init(layout(total_bytes, 2), self.gen)
        self.served = {k: v.to(torch.bfloat16) for k, v in self.master.items()}
        # One Adam direction per tensor, drawn once (8 noisy gradients each is
        # slow): each step rolls it by a random offset, a fresh assignment of
        # the same distribution to the elements.
        self.direction = {k: _adam_direction(v.numel(), self.gen) for k, v in self.master.items()}
        self._lr: dict[float, float] = {}

    def lr_for(self, fraction: float) -> float:
        """The step size that changes ``fraction`` of the served elements (bisected on a
        sample of the matrices, once per fraction)."""
        if fraction not in self._lr:
            sample = torch.cat([v.flatten()[:65536] for v in self.master.values() if v.dim() > 1])
            dirs = torch.cat(
                [self.direction[k][:65536] for k, v in self.master.items() if v.dim() > 1]
            )
            served = sample.to(torch.bfloat16).view(torch.int16)
            lo, hi = 0.0, 1e-2
            for _ in range(40):
                lr = (lo + hi) / 2
                after = (sample - lr * dirs).to(torch.bfloat16).view(torch.int16)
                got = float((after != served).float().mean())
                if abs(got - fraction) < fraction / 100:
                    break
                lo, hi = (lr, hi) if got < fraction else (lo, lr)
            self._lr[fraction] = lr
        return self._lr[fraction]

    def step(self, fraction: float) -> None:
        """One optimiser step of the master weights; ``served`` is rounded again in place."""
        lr = self.lr_for(fraction)
        with torch.no_grad():
            for name, master in self.master.items():
                d, m = self.direction[name], master.view(-1)
                # The direction rolled by a random offset, without a copy of it.
                at = int(torch.randint(0, d.numel(), (1,), generator=self.gen))
                m[: d.numel() - at].sub_(d[at:], alpha=lr)
                m[d.numel() - at :].sub_(d[:at], alpha=lr)
                self.served[name].copy_(master)


def weights(total_bytes: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """``init``'s weights in ``dtype``, ``total_bytes`` in all."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v.to(dtype) for k, v in init(layout(total_bytes, dtype.itemsize), gen).items()}


def finetune_step(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Every float32 element moves by about 1e-4 of itself."""
    with torch.no_grad():
        for t in sd.values():
            t.mul_(1 + 1e-4 * torch.randn(t.shape, generator=gen))


def random_step(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Every matrix drawn again from N(0, 0.02); the vectors are kept."""
    with torch.no_grad():
        for t in sd.values():
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
