"""``hotswap verify`` of delta versions: every tensor reconstructed from stored blobs alone,
every delta blob a version names decoded, memory bounded by batches, not tensors."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from delta_support import CHUNK, Versions, flip, nudged
from test_reconstruct import NAME, chain

from hotswap.blobs import STREAM_BYTES
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli, upkeep

MiB = 1024 * 1024


def test_a_chain_verifies_and_a_corrupted_link_is_named(store: Store) -> None:
    vs = chain(store, 6, {4: "keyframe"})  # v1 full, v2-v3 deltas, v4 keyframe, v5-v7 deltas
    for v in range(1, 8):
        report = upkeep.verify(store, v)
        assert report.ok, (v, report.bad)
        assert report.bytes_checked == vs.entry(v, NAME).nbytes
    flip(store.client, vs.frame_key(6, NAME, 2), at=50)  # v6's delta, on v7's route
    bad = upkeep.verify(store, 7).bad[NAME]
    assert bad.startswith("cannot be reconstructed from stored blobs: ")
    assert "chunk 2 (delta of v6)" in bad and bad.endswith("; publish a full version")
    assert upkeep.verify(store, 5).ok  # before the broken link


def test_a_keyframes_delta_is_decoded_back_to_its_base(store: Store) -> None:
    vs = chain(store, 3, {3: "keyframe"})
    assert upkeep.verify(store, 3).ok
    store.client.delete(vs.frame_key(3, NAME, 1))
    assert upkeep.verify(store, 3).bad == {
        NAME: "delta frame 1 of 3 is missing from Redis (collected or lost); publish again"
    }
    assert upkeep.verify(store, 4).ok  # v4 starts at v3's full blob


def test_a_rollbacks_own_delta_is_checked_though_its_route_goes_another_way(
    store: Store,
) -> None:
    vs = chain(store, 1)
    back = vs.commit(vs.states[1], {NAME: "back"}, rollback_to=1)
    assert upkeep.verify(store, back).ok  # v1's full blob is the cheapest way to it
    flip(store.client, vs.frame_key(2, NAME, 0), at=20)  # a digest of its content
    assert (
        "does not carry the chunk digests its manifest signs"
        in upkeep.verify(store, back).bad[NAME]
    )


def test_the_cli_exit_code_says_a_delta_is_broken(
    store: Store, settings: HotswapSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    vs = chain(store, 2)
    assert cli.main(["verify", "m", "--redis-url", settings.redis_url]) == 0
    store.client.delete(vs.frame_key(3, NAME, 0))
    assert cli.main(["verify", "m", "--redis-url", settings.redis_url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hotswap: error: model 'm' v3: 1 of 1 tensors failed verification: 'w' (")
    assert "delta frame 0 of 3 is missing from Redis (collected or lost))" in err


def test_verify_reconstructs_a_delta_larger_than_its_buffers_in_bounded_memory(
    store: Store,
) -> None:
    numel = (3 * STREAM_BYTES) // 4 + 123
    vs = Versions(store, chunk_bytes=MiB)
    state = {"big": torch.arange(numel, dtype=torch.float32)}
    vs.commit(state, default="full")
    state = {"big": nudged(state["big"], seed=1, count=50)}
    v2 = vs.commit(state)
    assert vs.entry(v2, "big").delta is not None
    tracemalloc.start()
    try:
        report = upkeep.verify(store, v2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.bytes_checked == numel * 4
    # A batch of the full blob and one of frames (reserved at their cap), never the tensor.
    assert peak < 3 * STREAM_BYTES < numel * 4 + CHUNK
    flip(store.client, vs.frame_key(v2, "big", vs.entry(v2, "big").chunks - 1), at=50)
    assert "chunk 96 (delta of v2)" in upkeep.verify(store, v2).bad["big"]
