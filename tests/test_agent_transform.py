"""An agent given a Transform updates fused parameters from a checkpoint that has them
apart, all-or-nothing (issue 15); examples/fused_qkv.py runs as its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
import torch
from agent_support import MODEL, commit_raw, snapshot

from hotswap import validate
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.transform import Transform

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "fused_qkv.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fused_qkv", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fq = load_example()


def checkpoint_state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: t.detach() * scale for k, t in fq.stack(fq.CheckpointBlock).state_dict().items()}


def test_the_example_runs_as_a_script(settings: HotswapSettings) -> None:
    env = {**os.environ, "HOTSWAP_REDIS_URL": settings.redis_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "v1_same_output": True,
        "v2_same_output": True,
        "v2_tensors_changed": 1,
        "v2_bytes_fetched": fq.DIM * fq.DIM * 4,  # q_proj of layer 0 only
        "v3_refused": {"1.k_proj.weight": ["1 of 1024 values are not finite (NaN or inf)"]},
        "v3_unchanged": True,
        "applied_version": 2,
        "versions": [1, 2, 3],
    }


def failing(after: int) -> Transform:
    """The example's transform, raising after writing ``after`` tensors (half a version)."""

    def load(published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
        for i, name in enumerate(sorted(published)):
            if i == after:
                raise RuntimeError("boom")
            fq.load_weights({name: published[name]}, live)

    return Transform(fq.claims, load)


def test_a_transform_that_raises_midway_changes_nothing(
    settings: HotswapSettings, store: Store
) -> None:
    served = fq.stack(fq.FusedBlock)
    v = commit_raw(store, checkpoint_state(1.5))
    before = snapshot(served)
    with Agent(served, MODEL, settings=settings, transform=failing(after=3)) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {"<transform>": ["the transform raised RuntimeError: boom"]}
        # Not the fused tensors it wrote, nor the tensors matched by name (o_proj, down_proj).
        assert snapshot(served) == before and agent.applied_version is None


def test_what_the_transform_writes_is_validated_by_live_name(
    settings: HotswapSettings, store: Store
) -> None:
    served = fq.stack(fq.FusedBlock)
    v = commit_raw(store, checkpoint_state())
    with Agent(served, MODEL, settings=settings, transform=fq.FUSED) as agent:
        assert agent.wait_for(v, 10)
        before = snapshot(served)

        def tenfold(
            published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
        ) -> None:
            fq.load_weights({k: t * 100 for k, t in published.items()}, live)

        agent._pipeline.intake.transform = Transform(fq.claims, tenfold)
        bigger = checkpoint_state()
        bigger["0.k_proj.weight"] = bigger["0.k_proj.weight"] * 1.01
        v2 = commit_raw(store, bigger)
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v2, 10)
        (reason,) = e.value.reasons["0.qkv_proj.weight"]
        assert reason.startswith("norm ratio new/old ")
        assert list(e.value.reasons) == ["0.qkv_proj.weight"]
        assert snapshot(served) == before and agent.applied_version == v


def test_a_transform_that_reaches_an_unclaimed_tensor_is_refused(
    settings: HotswapSettings, store: Store
) -> None:
    served = fq.stack(fq.FusedBlock)

    def strays(published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
        live["0.o_proj.weight"].zero_()

    v = commit_raw(store, checkpoint_state())
    before = snapshot(served)
    with Agent(served, MODEL, settings=settings, transform=Transform(fq.claims, strays)) as a:
        with pytest.raises(ValidationError) as e:
            a.wait_for(v, 10)
        assert e.value.reasons == {
            "<transform>": [
                "the transform raised KeyError: '0.o_proj.weight' is not a live tensor the "
                "transform claimed (claims() must name every live tensor load() writes)"
            ]
        }
        assert snapshot(served) == before


def test_claims_of_a_tensor_the_model_lacks_are_refused_before_any_fetch(
    settings: HotswapSettings, store: Store
) -> None:
    served = fq.stack(fq.FusedBlock)
    wrong = Transform(
        lambda n: "0.qkv.weight" if ".q_proj." in n else fq.claims(n), fq.load_weights
    )
    v = commit_raw(store, checkpoint_state())
    with Agent(served, MODEL, settings=settings, transform=wrong) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        assert e.value.reasons == {
            "<transform>": ["claims live tensors the model lacks: '0.qkv.weight'"]
        }
        assert agent.reporter.status.bytes_fetched == 0


def test_claims_that_raise_refuse_the_version(settings: HotswapSettings, store: Store) -> None:
    served = fq.stack(fq.FusedBlock)

    def claims(name: str) -> str | None:
        raise ValueError(f"no rule for {name}")

    v = commit_raw(store, checkpoint_state())
    before = snapshot(served)
    with Agent(served, MODEL, settings=settings, transform=Transform(claims, fq.load_weights)) as a:
        with pytest.raises(ValidationError) as e:
            a.wait_for(v, 10)
        assert e.value.reasons == {
            "<transform>": ["claims() raised ValueError: no rule for 0.down_proj.weight"]
        }
        assert snapshot(served) == before


def test_without_the_transform_the_fused_model_refuses_the_checkpoint(
    settings: HotswapSettings, store: Store
) -> None:
    served = fq.stack(fq.FusedBlock)
    v = commit_raw(store, checkpoint_state())
    with Agent(served, MODEL, settings=settings) as agent:
        with pytest.raises(ValidationError) as e:
            agent.wait_for(v, 10)
        # Half the live names match (o_proj, down_proj): enough coverage, then each
        # checkpoint name is unknown and each fused tensor missing.
        assert e.value.reasons["0.q_proj.weight"] == [validate.UNKNOWN]
        assert e.value.reasons["0.qkv_proj.weight"] == [validate.MISSING]
        assert len(e.value.reasons) == 22


def test_a_tensor_parallel_slice_is_a_transform_that_keeps_the_name(
    settings: HotswapSettings, store: Store
) -> None:
    # Rank 1 of 2 holds rows 4..8 of each weight (a column-parallel linear, as
    # vLLM shards it): the shape check moves from the name path to the transform.
    rank, world = 1, 2
    g = torch.Generator().manual_seed(0)
    full = {"fc.weight": torch.randn(8, 4, generator=g), "fc.bias": torch.randn(8, generator=g)}
    shard = {k: torch.ones_like(t.chunk(world)[rank]) for k, t in full.items()}

    def load(published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
        for name, t in published.items():
            live[name].copy_(t.chunk(world)[rank])

    sliced = Transform(lambda name: name, load)
    v = commit_raw(store, full)
    with Agent(shard, MODEL, settings=settings, transform=sliced) as agent:
        assert agent.wait_for(v, 10)
    assert all(torch.equal(shard[k], full[k][4:]) for k in full)
