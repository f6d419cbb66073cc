"""A serving model with fused projections, updated from a checkpoint that has them apart.

    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python examples/fused_qkv.py

Serving engines (vLLM, TensorRT-LLM) fuse ``q_proj``, ``k_proj`` and ``v_proj``
into one ``qkv_proj``, and ``gate_proj`` and ``up_proj`` into ``gate_up_proj``,
so their parameters are not the checkpoint's. Their ``load_weights`` copies
each checkpoint tensor into its rows of the fused one. Given to an agent as a
``Transform``, the same function keeps the fused model at the head version:
the published tensors are checked against their digests first, the transform
writes into copies of the fused tensors, the copies are validated, and all of
them land together under the writer lock, or none does.

The script publishes a checkpoint-layout model, serves a fused copy, then
shows that: the fused model computes what the checkpoint model computes; a
step that changes only ``q_proj`` fetches only ``q_proj``; and a version with
a NaN in ``k_proj`` is refused with the fused model untouched. It prints one
JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import torch

from hotswap import Agent, HotswapSettings, ValidationError
from hotswap.reporter import ApplyReport
from hotswap.settings import load as load_settings
from hotswap.transform import Transform
from publisher.publisher import Publisher

DIM, HIDDEN, LAYERS = 32, 64, 2
# fused live tensor -> the checkpoint tensors stacked in it, in row order.
STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class CheckpointBlock(torch.nn.Module):
    """One block as the trainer holds it (Hugging Face layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(DIM, DIM)
        self.k_proj = torch.nn.Linear(DIM, DIM)
        self.v_proj = torch.nn.Linear(DIM, DIM)
        self.o_proj = torch.nn.Linear(DIM, DIM)
        self.gate_proj = torch.nn.Linear(DIM, HIDDEN, bias=False)
        self.up_proj = torch.nn.Linear(DIM, HIDDEN, bias=False)
        self.down_proj = torch.nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        x = x + self.o_proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
        out: torch.Tensor = x + self.down_proj(
            torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        )
        return out


class FusedBlock(torch.nn.Module):
    """The same block as a serving engine holds it: q, k, v in one matmul, gate and up in one."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = torch.nn.Linear(DIM, 3 * DIM)
        self.o_proj = torch.nn.Linear(DIM, DIM)
        self.gate_up_proj = torch.nn.Linear(DIM, 2 * HIDDEN, bias=False)
        self.down_proj = torch.nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(DIM, dim=-1)
        x = x + self.o_proj(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)
        gate, up = self.gate_up_proj(x).split(HIDDEN, dim=-1)
        out: torch.Tensor = x + self.down_proj(torch.nn.functional.silu(gate) * up)
        return out


def stack(block: type[torch.nn.Module]) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(block() for _ in range(LAYERS)))


def _place(name: str) -> tuple[str, int, int] | None:
    """``(fused live name, index, parts)`` for a checkpoint name stacked in a fused tensor."""
    for fused, parts in STACKS.items():
        for i, part in enumerate(parts):
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), i, len(parts)
    return None


def claims(name: str) -> str | None:
    """The fused live tensor a checkpoint tensor goes into (None: matched by name)."""
    place = _place(name)
    return None if place is None else place[0]


def load_weights(published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
    """Copy each checkpoint tensor into its rows of the fused one (vLLM's pattern)."""
    for name, tensor in published.items():
        place = _place(name)
        assert place is not None  # only claimed names are given
        fused, index, parts = place
        rows = live[fused].shape[0] // parts
        live[fused][index * rows : (index + 1) * rows].copy_(tensor)


FUSED = Transform(claims, load_weights)


def same_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def main(settings: HotswapSettings, model_name: str = "fused-demo") -> dict[str, object]:
    """Publish, serve fused, step, refuse a NaN; returns what was seen."""
    trainer, served = stack(CheckpointBlock), stack(FusedBlock)
    reports: list[ApplyReport] = []
    seen: dict[str, object] = {}
    with (
        Publisher(model_name, settings=settings) as pub,
        Agent(
            served,
            model_name,
            settings=settings,
            transform=FUSED,
            on_applied=lambda v, r: reports.append(r),
        ) as agent,
    ):
        v1 = pub.publish(trainer.state_dict(), message="checkpoint layout")
        agent.wait_for(v1, timeout=30)
        seen["v1_same_output"] = same_output(trainer, served)

        first = trainer[0]
        assert isinstance(first, CheckpointBlock)
        with torch.no_grad():  # a step that changes one projection of one layer
            first.q_proj.weight.mul_(1.01)
        v2 = pub.publish(trainer.state_dict(), message="q_proj of layer 0")
        agent.wait_for(v2, timeout=30)
        seen["v2_same_output"] = same_output(trainer, served)
        seen["v2_tensors_changed"] = reports[-1].tensors_changed
        seen["v2_bytes_fetched"] = reports[-1].bytes_fetched

        before = {k: t.clone() for k, t in served.state_dict().items()}
        bad = {k: t.clone() for k, t in trainer.state_dict().items()}
        bad["1.k_proj.weight"][0, 0] = float("nan")
        v3 = pub.publish(bad, message="a NaN in k_proj")
        try:
            agent.wait_for(v3, timeout=30)
            seen["v3_refused"] = None
        except ValidationError as e:
            seen["v3_refused"] = e.reasons
        after = served.state_dict()
        seen["v3_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        seen["applied_version"] = agent.applied_version
        seen["versions"] = [v1, v2, v3]
    return seen


if __name__ == "__main__":
    print(json.dumps(main(load_settings())))
    sys.exit(0)
