"""Reading a version's small blobs ahead in one round trip (``hotswap.prefetch``),
against a real redis-server: what is read ahead, that it passes the store's own
checks with the store's own messages, and that anything else still reads Redis."""

from __future__ import annotations

import pytest
import redis
import torch
from delta_support import Versions, flip, nudged

from hotswap import codec
from hotswap.blobs import BlobStore
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry
from hotswap.prefetch import SMALL_BLOB_BYTES, Prefetched
from hotswap.store import Store


def two_versions(store: Store) -> tuple[Versions, dict[str, TensorEntry], dict[str, str]]:
    """v1 full; v2 with a sparse delta of ``w`` and a new small full ``b``.

    Returns the versions, v2's entries by name, and the digests v1 runs.
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    b = torch.randn(256, generator=g)
    vs = Versions(store)
    v1 = vs.commit({"w": w, "b": b}, default="full")
    v2 = vs.commit({"w": nudged(w, 1, count=20), "b": b + 1}, {"b": "full"})
    running = {e.name: e.digest for e in vs.manifests[v1].tensors}
    entries = vs.manifests[v2].by_name()
    assert entries["w"].delta is not None and entries["b"].delta is None
    return vs, entries, running


def frames_of(reader: BlobStore | Prefetched, entry: TensorEntry, version: int) -> list[bytes]:
    return [bytes(f) for f in reader.frames(entry, version)]


def test_small_blobs_are_read_ahead_once_and_match_the_store(
    store: Store, client: redis.Redis
) -> None:
    vs, entries, running = two_versions(store)
    want_frames = frames_of(store.blobs, entries["w"], 2)
    ahead = Prefetched(store.blobs, list(entries.values()), running, 2)
    # Read ahead: gone from Redis, still served, and as the store served them.
    for key in [vs.frame_key(2, "w", i) for i in range(entries["w"].chunks)]:
        client.delete(key)
    for key in vs.full_keys(2, "b"):
        client.delete(key)
    assert frames_of(ahead, entries["w"], 2) == want_frames
    out = bytearray(entries["b"].nbytes)
    landed: list[int] = []
    ahead.read_into(entries["b"], memoryview(out), 2, lambda i, n: landed.append(i))
    assert codec.digest(out) == entries["b"].digest
    assert landed == list(range(entries["b"].chunks))
    # Once: a second read (a route planned again) goes to Redis, where they are gone.
    with pytest.raises(IntegrityError, match=r"delta frame 0 of \d+ is missing from Redis"):
        frames_of(ahead, entries["w"], 2)
    with pytest.raises(IntegrityError, match="chunk 0 of 1 is missing from Redis"):
        ahead.read_into(entries["b"], memoryview(out), 2)


def test_only_deltas_from_running_bytes_and_small_blobs_are_read_ahead(store: Store) -> None:
    vs, entries, running = two_versions(store)
    big = torch.randn(SMALL_BLOB_BYTES // 4 + 1)
    v3 = vs.commit({"w": vs.states[2]["w"], "b": vs.states[2]["b"], "big": big}, default="full")
    big_entry = vs.manifests[v3].by_name()["big"]
    # An agent not at the delta's base reads nothing of it ahead.
    ahead = Prefetched(store.blobs, [entries["w"], big_entry], {"w": "0" * 64}, 2)
    assert not ahead._ahead
    # Over the budget: read from Redis when asked, as before.
    ahead = Prefetched(store.blobs, list(entries.values()), running, 2, budget=16)
    assert not ahead._ahead
    assert frames_of(ahead, entries["w"], 2) == frames_of(store.blobs, entries["w"], 2)


def test_read_ahead_bytes_pass_the_stores_checks(store: Store, client: redis.Redis) -> None:
    vs, entries, running = two_versions(store)
    w, b = entries["w"], entries["b"]
    # A frame cut short: the frames do not add up; a small blob too long: refused.
    key = vs.frame_key(2, "w", 0)
    client.set(key, client.get(key)[:-1])  # type: ignore[index]
    (bkey,) = vs.full_keys(2, "b")
    client.append(bkey, b"x")
    for reader in (store.blobs, Prefetched(store.blobs, [w, b], running, 2)):
        with pytest.raises(IntegrityError, match=r"delta frames add up to \d+ bytes, the manifest"):
            frames_of(reader, w, 2)
        with pytest.raises(IntegrityError, match=rf"chunk 0 is {b.nbytes + 1} bytes, expected"):
            reader.read_into(b, memoryview(bytearray(b.nbytes)), 2)


def test_a_flipped_frame_is_found_by_the_agent_not_passed(
    store: Store, client: redis.Redis
) -> None:
    # Read ahead or not, a frame is only bytes: the reconstruction's digest check refuses it.
    from hotswap.reconstruct import Rebuild

    vs, entries, running = two_versions(store)
    flip(client, vs.frame_key(2, "w", 0))
    w = entries["w"]
    ahead = Prefetched(store.blobs, [w], running, 2)
    live = codec.as_bytes(vs.states[1]["w"])
    out = bytearray(w.nbytes)
    rebuild = Rebuild(ahead, vs.manifests[2], w, where="model 'm' v2")
    with pytest.raises(IntegrityError):
        rebuild.into(memoryview(out), (running["w"], lambda: live))
    assert w.delta is not None and w.delta.blob in rebuild.broken
