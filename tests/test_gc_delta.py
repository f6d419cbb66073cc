"""gc with deltas (issue 14): it keeps every blob a kept version needs to be
reconstructed, through older keyframes or newer ones read backwards, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import blake3
import pytest
import redis
import torch

from hotswap import chain, delta, keys
from hotswap.blobs import blob_ids
from hotswap.entries import DeltaRef, TensorEntry
from hotswap.manifest import Manifest
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import render
from publisher.gc import Needs, needed_blobs
from publisher.publisher import Publisher

CHUNK = 4096

# -- pure: hand-made versions of one tensor ----------------------------------------------


def d(c: str) -> str:
    return c * 64


def full(c: str) -> TensorEntry:
    return TensorEntry("w", "U8", (CHUNK,), CHUNK, d(c), CHUNK, 1.0, 1.0)


def delta_entry(base: str, c: str, keyframe: bool = False) -> TensorEntry:
    ref = DeltaRef(("xor-zstd",), d(base), blob(base, c), 100, "0" * 64, keyframe, 1, 100)
    return TensorEntry("w", "U8", (CHUNK,), CHUNK, d(c), CHUNK, 1.0, 1.0, ref)


def blob(base: str, c: str) -> str:
    return delta.blob_name(d(base), d(c), CHUNK)


def fid(c: str) -> str:
    return keys.blob_id(d(c), CHUNK, 1)


def did(base: str, c: str) -> str:
    return keys.blob_id(blob(base, c), CHUNK, 1)


def version(v: int, e: TensorEntry) -> Manifest:
    return Manifest("m", v, v - 1 or None, "l" * 32, (e,))


# v1 full a; v2 a->b; v3 b->c, a keyframe (full c too); v4 c->d; v5 d->e; v6 e->f
HISTORY = {
    1: version(1, full("a")),
    2: version(2, delta_entry("a", "b")),
    3: version(3, delta_entry("b", "c", keyframe=True)),
    4: version(4, delta_entry("c", "d")),
    5: version(5, delta_entry("d", "e")),
    6: version(6, delta_entry("e", "f")),
}
STORED = {b for m in HISTORY.values() for e in m.tensors for b in blob_ids(e)}


class Reads:
    """The older manifests gc is offered, newest first, counting those it reads."""

    def __init__(self, versions: list[int]) -> None:
        self.versions = versions
        self.read: list[int] = []

    def __iter__(self) -> Iterator[Manifest]:
        for v in sorted(self.versions, reverse=True):
            self.read.append(v)
            yield HISTORY[v]


def needs(kept: list[int], stored: set[str] = STORED) -> tuple[Needs, Reads]:
    older = Reads([v for v in HISTORY if v not in kept])
    return needed_blobs({v: HISTORY[v] for v in kept}, iter(older), stored), older


def test_a_keyframe_among_the_kept_versions_starts_every_chain() -> None:
    n, older = needs([3, 4, 5])
    assert n.blobs == {fid("c"), did("b", "c"), did("c", "d"), did("d", "e")}
    assert (n.chain_versions, n.broken, older.read) == ([], {}, [])


def test_an_older_kept_version_reaches_a_newer_keyframe_backwards() -> None:
    n, older = needs([2, 3])
    # b is v3's delta read backwards from c's full blob: a's full blob may go.
    assert n.blobs == {did("a", "b"), fid("c"), did("b", "c")}
    assert (n.chain_versions, older.read) == ([], [])


def test_older_manifests_carry_a_chain_no_kept_entry_reaches() -> None:
    n, older = needs([5, 6])
    # From the keyframe c (named by v3) through v4's delta: those manifests stay,
    # but only their blobs on the chain (v3's own delta b->c goes).
    assert n.blobs == {fid("c"), did("c", "d"), did("d", "e"), did("e", "f")}
    assert (n.chain_versions, n.broken) == ([3, 4], {})
    assert older.read == [4, 3]  # read no further than the keyframe


def test_a_chain_no_stored_blob_starts_is_reported_not_kept_or_dropped_silently() -> None:
    lost = STORED - {fid("a"), fid("c")}
    n, older = needs([2], lost)
    assert n.blobs == {did("a", "b")}
    assert n.broken == {"v2 tensor 'w'": "no full blob starts a chain of deltas to it"}
    assert older.read == [6, 5, 4, 3, 1]  # every older manifest was looked at


# -- against Redis: a run of publishes with keyframes --------------------------------------


def bf16(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(128, 256, generator=g).to(torch.bfloat16),  # 1 chunk of 64 KiB
        "b": torch.randn(2048, generator=g).to(torch.bfloat16),
    }


def step(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        flat = t.clone().view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 64)]
        flat[idx] = flat[idx] * 1.5 + 0.01
        out[name] = flat.view(t.shape)
    return out


def reconstruct(client: redis.Redis, store: Store, e: TensorEntry) -> bytes:
    """A content's bytes from stored blobs alone, routed over every stored manifest."""
    indexed = index(client)
    named: dict[str, TensorEntry] = {}  # blob id -> an entry naming it
    fulls, deltas = [], []
    for m in (store.manifest(v) for v in store.versions()):
        for x in m.tensors:
            for b in set(blob_ids(x)) & indexed:
                named[b] = x
                if x.delta is not None and b == keys.blob_id(x.delta.blob, x.chunk_bytes, 1):
                    deltas.append(chain.Delta(x.delta.base, x.digest, x.delta.stored_bytes, blob=b))
                else:
                    fulls.append(chain.Full(x.digest, x.nbytes, blob=b))
    route = chain.plan_route(e.digest, fulls=fulls, deltas=deltas)
    assert route.full is not None
    out = bytearray(e.nbytes)
    store.blobs.read_into(named[route.full.blob], memoryview(out))
    for link in route.links:
        x = named[link.delta.blob]
        assert x.delta is not None
        names = keys.chunk_keys("hotswap", "m", x.delta.blob, x.chunk_bytes, x.chunks)
        frames = [f for f in client.mget(names) if isinstance(f, bytes)]
        stored_backwards = x.delta.blob != delta.blob_name(x.delta.base, x.digest, x.chunk_bytes)
        back = link.backwards != stored_backwards
        delta.decode(frames, memoryview(out), memoryview(out), x.chunk_bytes, backwards=back)
    assert blake3.blake3(out).hexdigest() == e.digest
    return bytes(out)


def index(client: redis.Redis) -> set[str]:
    return set(Store(client, "m").blobs.blob_index())


def chunk_keys(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=keys.blob_prefix("hotswap", "m") + "*")}


def keys_of(blobs: set[str]) -> set[str]:
    return {k for b in blobs for k in keys.blob_keys_of_id("hotswap", "m", b, range(1))}


@pytest.fixture
def run(
    settings: HotswapSettings, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Publisher, dict[int, dict[str, torch.Tensor]]]]:
    """v1 full, then deltas, a keyframe at v5 (the policy: past 3 links)."""
    monkeypatch.setattr(chain, "keyframe_due", lambda links, chain_bytes, full: links > 3)
    grace0 = settings.model_copy(update={"gc_grace_seconds": 0.0})
    with Publisher("m", settings=grace0, connection=client) as pub:
        sds = {1: bf16(0)}
        pub.publish(sds[1])
        for v in range(2, 8):
            sds[v] = step(sds[v - 1], v)
            assert pub.publish(sds[v]) == v and pub.last_report.tensors_delta == 2
        yield pub, sds


def test_gc_keeps_exactly_what_kept_versions_need_and_they_reconstruct(
    run: tuple[Publisher, dict[int, dict[str, torch.Tensor]]], store: Store, client: redis.Redis
) -> None:
    pub, sds = run
    m = {v: store.manifest(v) for v in range(1, 8)}
    assert [e.delta.keyframe for e in m[5].tensors if e.delta] == [True, True]
    own = {v: {b for e in m[v].tensors for b in blob_ids(e)} for v in m}

    # Keep v4..v7: v4 reaches v5's keyframe backwards; v1's full blob and the
    # deltas of v2 and v3 go.
    r = pub.gc(keep=4)
    assert (r.kept, r.deleted_versions, r.chain_versions, r.broken_chains) == (
        [4, 5, 6, 7],
        [1, 2, 3],
        [],
        {},
    )
    wanted = own[4] | own[5] | own[6] | own[7]
    assert index(client) == wanted and chunk_keys(client) == keys_of(wanted)
    assert r.blobs_deleted == len((own[1] | own[2] | own[3]) - wanted)
    for v in (4, 5, 6, 7):
        for e in store.manifest(v).tensors:
            assert reconstruct(client, store, e) == bytes(
                sds[v][e.name].contiguous().view(torch.uint8).numpy()
            )
    # v4 is reached only backwards from v5's keyframe: verify follows newer
    # manifests too, and a rollback to it (whose parents are the newer versions) works.
    assert all(pub.verify(v).ok for v in (4, 5, 6, 7))
    assert pub.rollback(to=4) == 8 and pub.verify(8).ok

    # Keep v6..v8: v8 is v4's content again, reached from v5's keyframe backwards,
    # which only v5 names: its manifest stays (a chain version), v4's goes.
    r = pub.gc(keep=3)
    assert (r.kept, r.deleted_versions, r.chain_versions) == ([6, 7, 8], [4], [5])
    wanted = own[4] | own[5] | own[6] | own[7]
    assert index(client) == wanted and chunk_keys(client) == keys_of(wanted)
    assert store.versions() == [5, 6, 7, 8]
    assert all(pub.verify(v).ok for v in (6, 7, 8))
    assert "kept the manifests of v5 for kept versions' chains of deltas" in str(
        render.gc_line("m", r)
    )
    log = store.log(1)[0]
    assert log["kind"] == "gc" and "(and 1 for delta chains)" in log["message"]


def test_a_chain_version_keeps_only_its_blobs_on_the_chain(
    run: tuple[Publisher, dict[int, dict[str, torch.Tensor]]], store: Store, client: redis.Redis
) -> None:
    pub, sds = run
    m = {v: store.manifest(v) for v in range(1, 8)}
    # Keep v6, v7: their chains start at v5's keyframe, which only v5 names: its
    # manifest stays with its full blobs; its own deltas (to v4) and v1..v4 go.
    r = pub.gc(keep=2)
    assert (r.kept, r.deleted_versions, r.chain_versions) == ([6, 7], [1, 2, 3, 4], [5])
    full5 = {keys.blob_id(e.digest, e.chunk_bytes, e.chunks) for e in m[5].tensors}
    own = {v: {b for e in m[v].tensors for b in blob_ids(e)} for v in (6, 7)}
    wanted = full5 | own[6] | own[7]
    assert index(client) == wanted and chunk_keys(client) == keys_of(wanted)
    assert store.versions() == [5, 6, 7]
    for v in (6, 7):
        for e in store.manifest(v).tensors:
            assert reconstruct(client, store, e) == bytes(
                sds[v][e.name].contiguous().view(torch.uint8).numpy()
            )
        assert pub.verify(v).ok, pub.verify(v).bad


def test_gc_reports_a_kept_version_no_stored_blob_reconstructs(
    run: tuple[Publisher, dict[int, dict[str, torch.Tensor]]], store: Store, client: redis.Redis
) -> None:
    pub, _ = run
    # Redis lost v1's full blobs and v5's keyframe: v4 and v3 reach no full blob.
    lost = [
        keys.blob_id(e.digest, e.chunk_bytes, e.chunks)
        for v in (1, 5)
        for e in store.manifest(v).tensors
    ]
    store.blobs.delete_blobs(lost)
    before = index(client)
    r = pub.gc(keep=5, dry_run=True)
    assert sorted(r.broken_chains) == sorted(
        f"v{v} tensor {n!r}" for v in (3, 4, 5, 6, 7) for n in "ab"
    )
    assert all("no full blob starts a chain" in why for why in r.broken_chains.values())
    assert index(client) == before
    r = pub.gc(keep=5)
    # Their own blobs are kept (reported, not silently dropped); v1 and v2 go.
    own = {b for v in (3, 4, 5, 6, 7) for e in store.manifest(v).tensors for b in blob_ids(e)}
    assert index(client) == own & before
    assert r.deleted_versions == [1, 2] and len(r.broken_chains) == 10
    assert "cannot be reconstructed from stored blobs" in str(render.gc_line("m", r))
