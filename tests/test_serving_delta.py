"""A real serving process (tests/serving_worker.py) applies delta versions while it serves.

Every tensor of version k holds 100 + k: a step changes every element by the
same few bits, which XOR and zstd shrink to a few dozen bytes a tensor. The
worker's agent must fetch exactly those bytes (its status record counts
them), and no forward pass may see two versions at once.
"""

from __future__ import annotations

import sys

import torch
from delta_support import Versions
from test_serving_process import MODEL, WORKER, probe_state
from waiting import poll
from worker_proc import worker

from hotswap.settings import HotswapSettings
from hotswap.store import Store

LAST = 8


def test_a_serving_process_applies_deltas_fetching_only_them(
    settings: HotswapSettings, store: Store
) -> None:
    served = Store(store.client, MODEL)
    vs = Versions(served, chunk_bytes=16 * 1024)
    with worker(WORKER, settings.redis_url, MODEL, LAST, served) as w:
        vs.commit(probe_state(1), default="full")
        for k in range(2, LAST + 1):
            v = vs.commit(probe_state(k))
            assert all(e.delta is not None for e in vs.manifests[v].tensors)
            if k % 2 == 0:  # some applied one by one, the others back to back
                assert poll(lambda v=v: w.runs(v))
        result = w.result()
    assert result["reached_last"] is True
    assert result["mixed_count"] == 0, result["mixed"]
    assert result["pointers_unchanged"] is True
    assert result["digests"] == {n: e.digest for n, e in vs.manifests[LAST].by_name().items()}
    status = w.record()
    full = sum(e.nbytes for e in vs.manifests[LAST].tensors)
    every_delta = sum(
        e.delta.stored_bytes for v in range(2, LAST + 1) for e in vs.manifests[v].tensors if e.delta
    )
    # v1 whole, then deltas only; missed versions are reached from what runs through
    # their deltas, each fetched once.
    assert getattr(status, "bytes_fetched", None) == full + every_delta
    assert every_delta < (LAST - 1) * full // 50  # under 2% of full transfers


def sparse_state(version: int) -> dict[str, torch.Tensor]:
    """The probe's state at ``version`` changing one element in 128 a step."""
    state = probe_state(0)
    sys.path.insert(0, str(WORKER.parent))
    try:
        import serving_worker
    finally:
        sys.path.pop(0)
    serving_worker.fill_sparse(state, version)
    return state


def test_a_serving_process_validates_and_applies_sparse_deltas_by_patch(
    settings: HotswapSettings, store: Store
) -> None:
    served = Store(store.client, MODEL)
    vs = Versions(served, chunk_bytes=16 * 1024)
    with worker(WORKER, settings.redis_url, MODEL, LAST, served) as w:
        vs.commit(sparse_state(1), default="full")
        assert poll(lambda: w.version() >= 1)
        for k in range(2, LAST + 1):
            v = vs.commit(sparse_state(k))
            assert all(e.delta is not None for e in vs.manifests[v].tensors)
            if k % 2 == 0:  # some applied one by one, the others back to back

                def reached(v: int = v) -> bool:
                    return w.version() >= v

                assert poll(reached)
        result = w.result()
    assert result["reached_last"] is True
    assert result["mixed_count"] == 0, result["mixed"]
    assert result["pointers_unchanged"] is True
    assert result["digests"] == {n: e.digest for n, e in vs.manifests[LAST].by_name().items()}
    tensors = len(vs.manifests[LAST].tensors)
    # v1 copied whole; every later version (one link or a chain of two from what
    # runs) checked and written from its changed elements only.
    assert result["patched"][0] == [0, 0]
    assert result["patched"][1:] == [[tensors, tensors]] * (len(result["applied"]) - 1)
    assert len(result["applied"]) >= LAST // 2 + 1
