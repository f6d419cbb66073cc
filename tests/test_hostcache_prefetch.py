"""The read-ahead of a version's small blobs with the host cache on (``hotswap.prefetch``
over a ``SharedBlobStore``): one round trip to Redis for what the cache lacks, the host
cache for the rest, and only checked bytes stored for the other agents of the host.

Against a real redis-server; its own count of GET calls (INFO commandstats) says what
was fetched. A second ``HostCache`` on the same folder stands for another agent of the
host: ``flock`` locks belong to open files, so two in one process exclude each other
as two processes do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch
from delta_support import Versions, nudged

from hotswap import codec
from hotswap.blobs import BlobStore
from hotswap.errors import IntegrityError
from hotswap.hostcache import HostCache
from hotswap.manifest import TensorEntry
from hotswap.prefetch import Prefetched
from hotswap.sharedblobs import SharedBlobStore
from hotswap.store import Store

BUDGET = 64 << 20


def get_calls(client: redis.Redis) -> int:
    """GET commands the server has run (INFO commandstats)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def rl_step(store: Store) -> tuple[Versions, list[TensorEntry], dict[str, str]]:
    """v1 full; v2 changes every tensor a little: deltas of the weights, small biases whole.

    Returns the versions, v2's entries, and the digests v1 runs.
    """
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(64, 256, generator=g).to(torch.bfloat16) for i in range(3)}
    state |= {f"b{i}": torch.randn(256, generator=g) for i in range(3)}
    vs = Versions(store)
    v1 = vs.commit(state, default="full")
    step = {n: nudged(t, 1, count=20) if n.startswith("w") else t + 1 for n, t in state.items()}
    v2 = vs.commit(step, {n: "full" for n in step if n.startswith("b")})
    running = {e.name: e.digest for e in vs.manifests[v1].tensors}
    entries = list(vs.manifests[v2].tensors)
    assert sum(e.delta is not None for e in entries) == 3
    return vs, entries, running


def agent_store(store: Store, folder: Path) -> SharedBlobStore:
    """The store's blobs read through the host cache at ``folder`` (one agent's view)."""
    return SharedBlobStore.around(store.blobs, HostCache(folder, BUDGET, wait=5.0))


def read_all(reader: Prefetched | BlobStore, entries: list[TensorEntry]) -> list[bytes]:
    """What a reconstruction reads: each delta's frames, each full blob's bytes."""
    out: list[bytes] = []
    for e in entries:
        if e.delta is not None:
            out.append(b"".join(bytes(f) for f in reader.frames(e, 2)))
        else:
            buf = bytearray(e.nbytes)
            reader.read_into(e, memoryview(buf), 2)
            assert codec.digest(buf) == e.digest
            out.append(bytes(buf))
    return out


def chunk_keys(entries: list[TensorEntry]) -> int:
    """GETs of one round trip for ``entries``: one per frame or chunk."""
    return sum(e.chunks for e in entries)


def test_small_blobs_come_in_one_round_trip_then_from_the_host_cache(
    store: Store, client: redis.Redis, tmp_path: Path
) -> None:
    _, entries, running = rl_step(store)
    want = read_all(store.blobs, entries)
    first, second = agent_store(store, tmp_path / "c"), agent_store(store, tmp_path / "c")
    batches: list[int] = []
    real = first.get_capped

    def counted(names: list[str], *rest: object) -> object:
        batches.append(len(names))
        return real(names, *rest)  # type: ignore[arg-type]

    first.get_capped = counted  # type: ignore[method-assign,assignment]
    before = get_calls(client)
    ahead = Prefetched(first, entries, running, 2)
    # One batch: every frame and small chunk of the version, one GET each, nothing more.
    assert batches == [chunk_keys(entries)]
    assert get_calls(client) - before == chunk_keys(entries)
    assert ahead.from_cache == 0
    assert read_all(ahead, entries) == want
    assert get_calls(client) - before == chunk_keys(entries)
    assert first.cache.stats["fills"] == len(entries)
    # The host's next agent: every blob from the cache, not one GET.
    before = get_calls(client)
    later = Prefetched(second, entries, running, 2)
    assert later.from_cache == len(entries)
    assert read_all(later, entries) == want
    assert get_calls(client) == before


def test_a_blob_another_agent_is_filling_is_left_to_its_file(
    store: Store, client: redis.Redis, tmp_path: Path
) -> None:
    _, entries, running = rl_step(store)
    want = read_all(store.blobs, entries)
    mine, other = agent_store(store, tmp_path / "c"), agent_store(store, tmp_path / "c")
    busy = next(e for e in entries if e.delta is None)
    name = f"b-{busy.digest}-{busy.nbytes}"
    before = get_calls(client)
    with other.cache.filling(name) as slot:
        assert slot.held
        ahead = Prefetched(mine, entries, running, 2)
        # Not fetched, not waited for: the rest came in the one batch.
        assert get_calls(client) - before == chunk_keys(entries) - busy.chunks
        assert mine.cache.stats["busy"] == 1 and mine.cache.stats["waits"] == 0
        slot.publish([want[entries.index(busy)]])  # the other agent's fill lands
    # Its bytes come from the other agent's file, the rest from the batch.
    assert read_all(ahead, entries) == want
    assert get_calls(client) - before == chunk_keys(entries) - busy.chunks


def test_bytes_that_fail_the_checks_are_not_stored_for_the_host(
    store: Store, client: redis.Redis, tmp_path: Path
) -> None:
    vs, entries, running = rl_step(store)
    w = next(e for e in entries if e.delta is not None)
    b = next(e for e in entries if e.delta is None)
    # A frame cut short (the frames do not add up), a full blob of the right length
    # with one byte changed (not the blob the manifest names).
    key = vs.frame_key(2, w.name, 0)
    client.set(key, client.get(key)[:-1])  # type: ignore[index]
    (bkey,) = vs.full_keys(2, b.name)
    value = bytearray(client.get(bkey))  # type: ignore[arg-type]
    value[0] ^= 1
    client.set(bkey, bytes(value))
    shared = agent_store(store, tmp_path / "c")
    ahead = Prefetched(shared, [w, b], running, 2)
    assert shared.cache.stats["fills"] == 0
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    # The agent's own reads still refuse them, with the store's messages.
    with pytest.raises(IntegrityError, match=r"delta frames add up to \d+ bytes, the manifest"):
        list(ahead.frames(w, 2))
    buf = bytearray(b.nbytes)
    ahead.read_into(b, memoryview(buf), 2)  # bytes only: the reader checks the digest
    assert codec.digest(buf) != b.digest
