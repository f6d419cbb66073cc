"""A real serving process (tests/serving_worker.py) takes 50 versions while it serves.

Every tensor of version k holds 100 + k, so each forward pass says exactly
which version each tensor was at: a pass that mixed two versions, or saw a
half-copied tensor, cannot go unnoticed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from waiting import poll
from worker_proc import worker

from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

WORKER = Path(__file__).with_name("serving_worker.py")
VERSIONS = 50
MODEL = "served"


def probe_state(version: int) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(WORKER.parent))
    try:
        import serving_worker
    finally:
        sys.path.pop(0)
    state = {k: t.clone() for k, t in serving_worker.Probe().state_dict().items()}
    serving_worker.fill(state, version)
    return state


def test_fifty_versions_while_serving_never_mix(
    redis_server: EmbeddedRedis, settings: HotswapSettings, store: Store
) -> None:
    with worker(WORKER, settings.redis_url, MODEL, VERSIONS, Store(store.client, MODEL)) as w:
        pub = Publisher(MODEL, settings=settings)
        published = []
        for k in range(1, VERSIONS + 1):
            published.append(pub.publish(probe_state(k), message=f"v{k}"))
            if k % 3 == 0:
                # Some versions are applied one by one, the others back to back.
                assert poll(lambda k=k: w.runs(k)), f"the worker did not apply v{k}"
        pub.close()
        assert published == list(range(1, VERSIONS + 1))
        result = w.result()
    assert result["reached_last"] is True
    assert result["mixed_count"] == 0, result["mixed"]
    applied = result["applied"]
    assert applied[-1] == VERSIONS
    assert applied == sorted(set(applied))  # in order; skipping only forward to a newer head
    assert result["pointers_unchanged"] is True
    final = Store(store.client, MODEL).manifest(VERSIONS).by_name()
    assert result["digests"] == {name: e.digest for name, e in final.items()}
    # The readers really ran across the updates, and saw them.
    assert result["passes"] >= 200
    assert len(result["seen"]) >= 5, result["seen"]
    print(f"{result['passes']} passes, {len(applied)} applies, {len(result['seen'])} versions seen")


@pytest.fixture(autouse=True)
def _flushed(client: object) -> None:
    """The `client` fixture empties Redis before the run."""
