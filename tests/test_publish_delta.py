"""The publisher writes deltas (issue 14): what it stores, where its base comes from,
keyframes, rollbacks, deltas off, and what show and log say."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import msgpack
import pytest
import redis
import torch
from safetensors.torch import save_file

from hotswap import blobs, chain, delta, keys
from hotswap.entries import DeltaRef, TensorEntry
from hotswap.errors import SourceError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli, deltas
from publisher.publisher import Publisher

KiB = 1024


def bf16_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16),  # 2 chunks
        "layer.weight": torch.randn(128, 256, generator=g).to(torch.bfloat16),  # 1 chunk
        "layer.bias": torch.randn(2048, generator=g).to(torch.bfloat16),
    }


def step(sd: dict[str, torch.Tensor], fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """An RL-like step: about ``fraction`` of each tensor's elements take new bf16 values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        flat = t.clone().view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, int(flat.numel() * fraction))]
        flat[idx] = flat[idx] * 1.5 + 0.01  # always another bf16 value
        out[name] = flat.view(t.shape)
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def frames_of(client: redis.Redis, entry: TensorEntry) -> list[bytes]:
    assert entry.delta is not None
    names = keys.chunk_keys("hotswap", "m", entry.delta.blob, entry.chunk_bytes, entry.chunks)
    frames = [f for f in client.mget(names) if isinstance(f, bytes)]
    assert len(frames) == entry.chunks, "a frame is missing"
    return frames


def full_stored(client: redis.Redis, entry: TensorEntry) -> bool:
    names = keys.chunk_keys("hotswap", "m", entry.digest, entry.chunk_bytes, entry.chunks)
    return bool(client.exists(*names) == len(names))


def blob_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(match=keys.blob_prefix("hotswap", "m") + "*"))


def manifest_format(client: redis.Redis, version: int) -> int:
    data = client.get(keys.manifest_key("hotswap", "m", version))
    return int(msgpack.unpackb(data, raw=False)["format"])


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings, connection=client)
    yield p
    p.close()


# -- pure ----------------------------------------------------------------------------


def test_blob_name_is_the_convention_and_tells_the_direction() -> None:
    base, result = "a" * 64, "b" * 64
    seed = b"hotswap-delta:" + base.encode() + b":" + result.encode() + b":1048576"
    assert delta.blob_name(base, result, 1 << 20) == blake3.blake3(seed).hexdigest()
    assert delta.blob_name(result, base, 1 << 20) != delta.blob_name(base, result, 1 << 20)
    assert delta.blob_name(base, result, 1 << 16) != delta.blob_name(base, result, 1 << 20)
    blob = keys.blob_id(delta.blob_name(base, result, 4096), 4096, 3)
    assert keys.blob_id_problem(blob, 1 << 20) is None  # indexed and collected like any blob


def entry(name: str, digest: str, ref: DeltaRef | None = None, nbytes: int = 8192) -> TensorEntry:
    return TensorEntry(name, "BF16", (nbytes // 2,), nbytes, digest, 4096, 1.0, 1.0, ref)


def ref(base: str, depth: int = 1, chain_bytes: int = 100, keyframe: bool = False) -> DeltaRef:
    return DeltaRef(("sparse-zstd",), base, "f" * 64, 100, "e" * 64, keyframe, depth, chain_bytes)


def test_a_delta_counts_its_chain_from_the_last_full_blob() -> None:
    new = torch.zeros(4096, dtype=torch.bfloat16)
    old = new.clone()
    old[7] = 1.0
    frames = delta.encode(memoryview(raw(new)), memoryview(raw(old)), 4096, itemsize=2)
    assert frames is not None
    stored = sum(map(len, frames))
    # From a full parent, or a keyframe: a new chain.
    for parent in (entry("w", "p" * 64), entry("w", "p" * 64, ref("o" * 64, 5, 900, True))):
        r = deltas.forward(parent, entry("w", "c" * 64), frames)
        assert (r.depth, r.chain_bytes, r.keyframe, r.stored_bytes) == (1, stored, False, stored)
        assert r.base == "p" * 64 and r.blob == delta.blob_name("p" * 64, "c" * 64, 4096)
        assert r.encodings == ("sparse-zstd",)
        assert r.frames_digest == blake3.blake3(b"".join(delta.result_digests(frames))).hexdigest()
    # From a delta: the chain goes on, and a keyframe is due past either bound.
    r = deltas.forward(entry("w", "p" * 64, ref("o" * 64, 3, 900)), entry("w", "c" * 64), frames)
    assert (r.depth, r.chain_bytes, r.keyframe) == (4, 900 + stored, False)
    long = ref("o" * 64, chain.MAX_CHAIN, 900)
    r = deltas.forward(entry("w", "p" * 64, long), entry("w", "c" * 64), frames)
    assert (r.depth, r.keyframe) == (chain.MAX_CHAIN + 1, True)
    heavy = ref("o" * 64, 2, 8192 // 2)
    assert deltas.forward(entry("w", "p" * 64, heavy), entry("w", "c" * 64), frames).keyframe


def test_parent_candidates_need_the_same_name_dtype_shape_and_other_bytes() -> None:
    new = entry("w", "c" * 64)
    assert deltas.parent_of(new, {}) is None
    assert deltas.parent_of(new, {"w": entry("w", "c" * 64)}) is None  # unchanged
    assert deltas.parent_of(new, {"w": entry("w", "p" * 64, nbytes=4096)}) is None  # shape
    other = TensorEntry("w", "F16", (4096,), 8192, "p" * 64, 4096, 1.0, 1.0)
    assert deltas.parent_of(new, {"w": other}) is None  # dtype
    assert deltas.parent_of(new, {"w": entry("w", "p" * 64)}) == entry("w", "p" * 64)
    # A chain already at the manifest's bound is not extended: a full blob goes.
    deep = entry("w", "p" * 64, ref("o" * 64, 64, 6400))
    assert deltas.parent_of(new, {"w": deep}) is None


# -- publishing ------------------------------------------------------------------------


def test_a_small_bf16_step_is_stored_as_a_small_delta_that_decodes_bit_exact(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    v1 = bf16_weights()
    pub.publish(v1)
    assert pub.last_report.tensors_delta == 0 and pub.last_report.base_held == sum(
        t.nbytes for t in v1.values()
    )
    v2 = step(v1, 0.015, seed=1)
    before = blob_keys(client)
    assert pub.publish(v2) == 2
    r = pub.last_report
    assert (r.tensors_changed, r.tensors_delta, r.keyframes) == (3, 3, 0)
    assert r.bases == {"memory": 3} and r.bytes_base_read == 0
    assert r.bytes_uploaded == r.bytes_delta < 0.1 * r.bytes_total
    assert r.base_held == r.bytes_total  # one copy of the model, the new one
    m1, m2 = store.manifest(1).by_name(), store.manifest(2).by_name()
    new_keys = blob_keys(client) - before
    assert len(new_keys) == sum(e.chunks for e in m2.values())  # delta frames only
    for name, e in m2.items():
        assert e.delta is not None and not e.delta.keyframe and e.delta.depth == 1
        assert e.delta.base == m1[name].digest and not full_stored(client, e)
        frames = frames_of(client, e)
        assert sum(map(len, frames)) == e.delta.stored_bytes
        assert delta.frames_digest(delta.result_digests(frames)) == e.delta.frames_digest
        out = bytearray(e.nbytes)
        delta.decode(frames, memoryview(raw(v1[name])), memoryview(out), e.chunk_bytes)
        assert bytes(out) == raw(v2[name])
        assert blake3.blake3(out).hexdigest() == e.digest
    # Issue 19: tensors of two chunks or more carry chunk digests (format 3); a
    # format-1 reader refuses both (deltas off keeps format 1: the test below).
    assert manifest_format(client, 2) == 3 and manifest_format(client, 1) == 3
    # The index names the blobs that exist: v1's, and v2's deltas (not full blobs
    # of v2 that a delta made unnecessary).
    assert set(store.blobs.blob_index()) == {
        b for m in (m1, m2) for e in m.values() for b in blobs.blob_ids(e)
    }


def test_random_new_weights_go_as_full_blobs(pub: Publisher, store: Store) -> None:
    pub.publish(bf16_weights(0))
    pub.publish(bf16_weights(1))
    r = pub.last_report
    assert (r.tensors_delta, r.bytes_delta) == (0, 0)
    assert r.bases == {"memory": 3} and r.bytes_uploaded == r.bytes_total
    assert all(e.delta is None for e in store.manifest(2).tensors)


def test_deltas_off_writes_format_1_manifests_only(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    v1 = bf16_weights()
    with Publisher("m", settings=settings, connection=client) as pub:
        pub.publish(v1)
        pub.publish(step(v1, 0.015, 1))  # a delta head
    off = settings.model_copy(update={"deltas": False})
    with Publisher("m", settings=off, connection=client) as pub:
        v3 = step(step(v1, 0.015, 1), 0.015, 2)
        v3["layer.bias"] = step(v1, 0.015, 1)["layer.bias"]  # unchanged since the delta head
        pub.publish(v3)
        r = pub.last_report
        assert (r.tensors_delta, r.bases, r.base_held) == (0, {}, 0)
        pub.publish(step(v3, 0.015, 3))
    for v in (3, 4):
        assert manifest_format(client, v) == 1
        m = store.manifest(v)
        assert all(e.delta is None and full_stored(client, e) for e in m.tensors)
    # The tensor left unchanged lost its delta entry for a full blob it now has.
    assert (
        store.manifest(3).by_name()["layer.bias"].digest
        == store.manifest(2).by_name()["layer.bias"].digest
    )


def test_a_keyframe_is_stored_when_the_chain_gets_long(
    pub: Publisher, store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The policy says a keyframe is due past 2 links.
    monkeypatch.setattr(chain, "keyframe_due", lambda links, chain_bytes, full: links > 2)
    sd = bf16_weights()
    pub.publish(sd)
    refs = []
    for v in range(2, 7):
        sd = step(sd, 0.015, v)
        pub.publish(sd)
        refs.append(store.manifest(v).by_name()["embed.weight"].delta)
        assert pub.last_report.keyframes == (3 if v == 4 else 0)
    assert [(r.depth, r.keyframe) for r in refs if r] == [
        (1, False),
        (2, False),
        (3, True),
        (1, False),
        (2, False),
    ]
    assert refs[3] and refs[3].chain_bytes == refs[3].stored_bytes  # restarted at the keyframe
    keyframe = store.manifest(4).by_name()["embed.weight"]
    assert full_stored(client, keyframe) and frames_of(client, keyframe)
    assert pub.last_report.bytes_uploaded < 0.1 * pub.last_report.bytes_total


def test_a_new_publisher_reads_the_parent_from_redis(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    v1 = bf16_weights()
    with Publisher("m", settings=settings, connection=client) as pub:
        pub.publish(v1)
    v2 = step(v1, 0.015, 1)
    with Publisher("m", settings=settings, connection=client) as pub:  # no base in memory
        pub.publish(v2)
        r = pub.last_report
    assert r.bases == {"redis": 3} and r.bytes_base_read == r.bytes_total
    assert r.tensors_delta == 3 and r.bytes_uploaded < 0.1 * r.bytes_total
    # A parent stored only as a delta is rebuilt from v1's full blobs and v2's
    # deltas, each checked.
    v3 = step(v2, 0.015, 2)
    with Publisher("m", settings=settings, connection=client) as pub:
        pub.publish(v3)
        r = pub.last_report
    stored2 = sum(e.delta.stored_bytes for e in store.manifest(2).tensors if e.delta)
    assert r.bases == {"redis": 3} and r.tensors_delta == 3
    assert r.bytes_base_read == r.bytes_total + stored2
    for name, e in store.manifest(3).by_name().items():
        assert e.delta is not None and e.delta.depth == 2
        assert e.delta.base == store.manifest(2).by_name()[name].digest
    # Redis lost v1's full blobs: no stored blob reaches v3's parent: full blobs,
    # and the report says the bases were missing.
    store.blobs.delete_blobs([b for e in store.manifest(1).tensors for b in blobs.blob_ids(e)])
    with Publisher("m", settings=settings, connection=client) as pub:
        pub.publish(step(v3, 0.015, 3))
        r = pub.last_report
    assert r.bases == {"missing": 3} and r.tensors_delta == 0
    assert all(e.delta is None for e in store.manifest(4).tensors)


def test_delta_base_off_keeps_nothing_and_reads_the_parent(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    off = settings.model_copy(update={"delta_base": False})
    v1 = bf16_weights()
    with Publisher("m", settings=off, connection=client) as pub:
        pub.publish(v1)
        assert pub.last_report.base_held == 0
        pub.publish(step(v1, 0.015, 1))
        r = pub.last_report
    assert r.bases == {"redis": 3} and r.tensors_delta == 3 and r.base_held == 0


def test_rollback_and_a_step_undone_store_no_new_bytes(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    v1 = bf16_weights()
    v2 = step(v1, 0.015, 1)
    pub.publish(v1)
    pub.publish(v2)
    pub.publish(step(v2, 0.015, 2))
    before = blob_keys(client)
    assert pub.rollback() == 4  # to v2
    assert pub.last_report.bytes_uploaded == 0 and blob_keys(client) == before
    assert store.manifest(4).tensors == store.manifest(2).tensors
    assert pub.rollback(to=1) == 5
    assert pub.last_report.bytes_uploaded == 0 and blob_keys(client) == before
    # Bytes whose full blob is stored (v1's) are an entry of that blob.
    pub.publish(v1, force=True)
    assert pub.last_report.bytes_uploaded == 0 and blob_keys(client) == before
    assert all(e.delta is None for e in store.manifest(6).tensors)
    # A publish of the bytes before head's, stored only as a delta, reads
    # head's own delta backwards.
    pub.rollback(to=3)  # v7
    pub.publish(v2)  # v8
    r = pub.last_report
    assert (r.bytes_uploaded, r.tensors_delta) == (0, 3) and blob_keys(client) == before
    m3, m8 = store.manifest(3).by_name(), store.manifest(8).by_name()
    for name, e in m8.items():
        d3 = m3[name].delta
        assert e.delta is not None and d3 is not None
        assert e.digest == d3.base and not full_stored(client, e)
        assert (e.delta.blob, e.delta.base, e.delta.depth) == (d3.blob, m3[name].digest, 3)
        assert e.delta.blob == delta.blob_name(e.digest, e.delta.base, e.chunk_bytes)
        frames = frames_of(client, e)  # read backwards, they carry v2's chunk digests
        assert delta.frames_digest([delta.read_header(f).base_digest for f in frames]) == (
            e.delta.frames_digest
        )
        out = bytearray(e.nbytes)  # v3's bytes back to v2's
        v3 = step(v2, 0.015, 2)[name]
        delta.decode(frames, memoryview(raw(v3)), memoryview(out), e.chunk_bytes, backwards=True)
        assert bytes(out) == raw(v2[name])


def test_a_tensor_changed_while_its_delta_uploads_is_refused(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    v1 = bf16_weights()
    pub.publish(v1)
    sd = step(v1, 0.015, 1)
    fired: list[int] = []

    def train_step(phase: str, done: int, total: int) -> None:
        if phase == "upload" and not fired:  # after the first delta went out
            fired.append(done)
            with torch.no_grad():
                for t in sd.values():
                    t.mul_(2)

    with pytest.raises(SourceError, match="changed while it was being published"):
        pub.publish(sd, progress=train_step)
    assert store.head() == 1 and store.versions() == [1]
    # The torn delta blob is gone; nothing but v1's blobs remain.
    v1_keys = {
        k.encode()
        for e in store.manifest(1).tensors
        for k in keys.chunk_keys("hotswap", "m", e.digest, e.chunk_bytes, e.chunks)
    }
    assert blob_keys(client) == v1_keys
    # The base forgot the torn copy: a publish of the settled bytes goes on.
    pub.publish(sd)
    r = pub.last_report
    assert r.created and r.tensors_changed == 3
    for name, e in store.manifest(2).by_name().items():
        assert blake3.blake3(raw(sd[name])).hexdigest() == e.digest


def test_the_base_is_one_copy_of_the_model_and_drops_what_was_replaced(
    pub: Publisher,
) -> None:
    sd = bf16_weights()
    total = sum(t.nbytes for t in sd.values())
    pub.publish(sd)
    for v in range(2, 5):
        sd = step(sd, 0.015, v)
        pub.publish(sd)
        assert pub.last_report.base_held == total
    small = {"embed.weight": sd["embed.weight"]}
    pub.publish(small, exclude=["layer.*"])
    assert pub.last_report.base_held == sd["embed.weight"].nbytes


# -- the command line --------------------------------------------------------------


@pytest.fixture
def run(
    server: Any, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> Iterator[Any]:
    for k in [k for k in os.environ if k.startswith("HOTSWAP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", str(64 * KiB))
    monkeypatch.chdir("/")

    def call(*args: str) -> tuple[int, str]:
        code = cli.main(list(args))
        return code, capsys.readouterr().out

    yield call


def test_cli_publish_says_where_the_base_came_from_and_show_and_log_tell_the_bytes(
    run: Any, tmp_path: Path, store: Store
) -> None:
    v1 = bf16_weights()
    save_file(v1, str(tmp_path / "v1.safetensors"))
    save_file(step(v1, 0.015, 1), str(tmp_path / "v2.safetensors"))
    assert run("publish", "m", str(tmp_path / "v1.safetensors"))[0] == 0
    code, out = run("publish", "m", str(tmp_path / "v2.safetensors"))
    assert code == 0
    assert "3 as deltas (" in out and "bases from redis 3, 200.7 kB read back" in out
    code, out = run("publish", "m", str(tmp_path / "v1.safetensors"), "--json")
    r = json.loads(out)
    assert (r["tensors_delta"], r["bytes_uploaded"], r["bases"]) == (0, 0, {})  # v1's blobs

    code, out = run("show", "m", "2", "--json")
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    e2 = store.manifest(2).by_name()
    for name, row in rows.items():
        ref = e2[name].delta
        assert ref is not None
        assert row["stored_as"] == "delta " + ",".join(ref.encodings)
        assert row["stored_bytes"] == ref.stored_bytes
        assert row["delta"]["base"] == ref.base
    code, out = run("show", "m", "1")
    assert code == 0 and out.count(" full ") == 3
    code, out = run("show", "m", "2")
    assert code == 0 and out.count("delta sparse-zstd") == 3
    stored = sum(e.delta.stored_bytes for e in e2.values() if e.delta)
    assert f"({stored / 1000:.1f} kB stored)" in out.replace("\n", " ")

    code, out = run("log", "m", "--json")
    rows = {int(row["version"]): row for row in json.loads(out) if row.get("version")}
    assert rows[2]["tensors_delta"] == 3 and rows[2]["bytes_uploaded"] == stored  # typed
    assert rows[2]["bases"] == {"redis": 3} and rows[1]["tensors_delta"] == 0
    code, out = run("log", "m")
    assert code == 0 and "(3 as deltas)" in out


def test_cli_show_marks_a_keyframe(
    pub: Publisher, run: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chain, "keyframe_due", lambda links, chain_bytes, full: True)
    sd = bf16_weights()
    pub.publish(sd)
    pub.publish(step(sd, 0.015, 1))
    code, out = run("show", "m", "--json")
    assert code == 0
    rows = json.loads(out)["tensors"]
    assert all(r["stored_as"].startswith("keyframe: full + delta") for r in rows)
    e = store.manifest(2).by_name()["embed.weight"]
    assert e.delta is not None
    by_name = {r["name"]: r for r in rows}
    assert by_name["embed.weight"]["stored_bytes"] == e.nbytes + e.delta.stored_bytes
    assert not math.isnan(by_name["embed.weight"]["norm"])


def test_tied_tensors_share_one_delta_and_only_inherits_entries(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    sd = bf16_weights()
    sd["lm_head.weight"] = sd["embed.weight"]  # tied: one blob
    pub.publish(sd)
    v2 = step(bf16_weights(), 0.015, 1)
    v2["lm_head.weight"] = v2["embed.weight"]
    before = blob_keys(client)
    pub.publish(v2)
    m2 = store.manifest(2).by_name()
    embed, head = m2["embed.weight"], m2["lm_head.weight"]
    assert embed.delta is not None and (embed.digest, embed.delta) == (head.digest, head.delta)
    assert pub.last_report.tensors_delta == 3  # one per content
    new = blob_keys(client) - before
    assert len(new) == sum(e.chunks for n, e in m2.items() if n != "lm_head.weight")
    # --only: the named tensors as deltas, the rest inherited as they are stored.
    v3 = step(v2, 0.015, 2)
    pub.publish({"layer.bias": v3["layer.bias"]}, only=["layer.bias"])
    m3 = store.manifest(3).by_name()
    assert pub.last_report.tensors_delta == 1
    assert m3["layer.bias"].delta is not None
    assert m3["layer.bias"].delta.base == m2["layer.bias"].digest
    assert {n: e for n, e in m3.items() if n != "layer.bias"} == {
        n: e for n, e in m2.items() if n != "layer.bias"
    }


def test_a_publishs_delta_frames_and_small_blobs_go_in_one_round_trip(
    pub: Publisher, store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of every delta of a publish, and its small full blobs, are pipelined
    together, not a round trip a tensor."""
    from hotswap.blobwrite import BlobWriter

    v1 = {**bf16_weights(), "norm": torch.randn(64, generator=torch.Generator().manual_seed(5))}
    pub.publish(v1)
    writes: list[list[str]] = []
    real = BlobWriter._write

    def counted(self: BlobWriter, names: list[str], values: list[memoryview]) -> None:
        writes.append(names)
        real(self, names, values)

    monkeypatch.setattr(BlobWriter, "_write", counted)
    v2 = {**step(bf16_weights(), 0.015, seed=1), "norm": torch.randn(64)}  # new: full
    pub.publish(v2)
    m2 = store.manifest(2).by_name()
    assert pub.last_report.tensors_delta == 3 and m2["norm"].delta is None
    assert len(writes) == 1 and len(writes[0]) == sum(e.chunks for e in m2.values())
    assert full_stored(client, m2["norm"])
    assert raw(v2["norm"]) == client.get(writes[0][-1])
    for name, e in m2.items():  # and the deltas decode
        if e.delta is not None:
            out = bytearray(e.nbytes)
            frames = frames_of(client, e)
            delta.decode(frames, memoryview(raw(v1[name])), memoryview(out), e.chunk_bytes)
            assert bytes(out) == raw(v2[name])


def test_a_tensor_whose_deltas_are_refused_is_probed_less_and_less(
    pub: Publisher, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New weights every step: after n refusals in a row a tensor goes full unprobed
    for its next 2**n - 1 publishes; a step that pays gets its delta back."""
    probes: list[int] = []
    real = delta._mostly_same

    def counted(*args: Any, **kwargs: Any) -> bool:
        probes[-1] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(delta, "_mostly_same", counted)
    held: list[int] = []
    for seed in range(7):
        probes.append(0)
        pub.publish(bf16_weights(seed))
        assert pub.last_report.tensors_delta == 0
        held.append(pub.last_report.base_held)
    assert probes == [0, 3, 0, 3, 0, 0, 0]  # v1 has no parent
    # A copy is kept only for a publish that probes next.
    total = sum(t.nbytes for t in bf16_weights().values())
    assert held == [total, 0, total, 0, 0, 0, total]
    sd = step(bf16_weights(6), 0.015, seed=1)
    probes.append(0)
    pub.publish(sd)  # probed again, and a small step: deltas from the kept copy
    assert probes[-1] == 3 and pub.last_report.tensors_delta == 3
    assert pub.last_report.bases == {"memory": 3}
    probes.append(0)
    pub.publish(step(sd, 0.015, seed=2))  # after a delta: encoded without a glance
    assert probes[-1] == 0 and pub.last_report.tensors_delta == 3


def test_a_sparse_deltas_statistics_are_derived_and_match_a_full_pass(
    pub: Publisher, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotswap import codec

    sd = bf16_weights()
    pub.publish(sd)
    measured: list[int] = []
    whole = codec.stats

    def counted(t: torch.Tensor) -> codec.Stats:
        measured.append(t.numel())
        return whole(t)

    monkeypatch.setattr(codec, "stats", counted)
    for i in range(1, 6):
        sd = step(sd, 0.015, seed=i)
        pub.publish(sd)
        m = store.head_manifest()
        assert m is not None
        for e in m.tensors:
            truth = whole(sd[e.name])
            assert e.max_abs == truth.max_abs
            assert math.isclose(e.norm, truth.norm, rel_tol=1e-12)
    # Only the tensors whose largest magnitude a step changed were measured whole.
    assert len(measured) < 5 * len(sd) / 2
