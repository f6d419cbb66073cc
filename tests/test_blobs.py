"""BlobStore against a real redis-server: upload, read back, missing, index, deletion.

Reads run over both paths, the zero-copy transport and redis-py's pipelines:
they share one chunk check, so every refusal reads the same on either.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import pytest
import redis
import torch
from blob_support import CHUNK, big_tensor, entry_for, snapshot

from hotswap import blobs as blobs_module
from hotswap import blobwrite, codec, keys, transport
from hotswap.blobs import BlobStore, check_chunk
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError, IntegrityError, StoreUnavailable
from hotswap.manifest import TensorEntry
from hotswap.store import Store

PATHS = ["fast", "pipelined"]


def make(client: redis.Redis, path: str = "fast", model: str = "m") -> BlobStore:
    blobs = BlobStore(client, model, retrying=operation_retry(3, 0.1))
    if path == "pipelined":
        blobs.__dict__["_blob_io"] = None  # the cached fast path, switched off
    else:
        assert blobs._blob_io is not None
    return blobs


@pytest.fixture
def blobs(client: redis.Redis) -> BlobStore:
    return make(client)


def read_back(blobs: BlobStore, entry: TensorEntry, version: int | None = 3) -> bytearray:
    out = bytearray(entry.nbytes)
    blobs.read_into(entry, memoryview(out), version)
    return out


def random_bytes(n: int, seed: int = 0) -> bytes:
    # Random, not a repeating pattern: an off-by-one chunk boundary would show.
    return random.Random(seed).randbytes(n)


def bytes_entry(name: str, data: bytes, chunk: int) -> TensorEntry:
    s = codec.stats(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    digest = codec.digest(data)
    return TensorEntry(name, "U8", (len(data),), len(data), digest, chunk, s.norm, s.max_abs)


# -- round trips -------------------------------------------------------------------


def test_store_blobs_share_the_stores_client_and_names(client: redis.Redis) -> None:
    store = Store(client, "m", namespace="ns")
    assert isinstance(store.blobs, BlobStore)
    assert (store.blobs.client, store.blobs.model, store.blobs.ns) == (client, "m", "ns")
    with pytest.raises(ConfigError, match=r"^invalid model name 'a b'"):
        BlobStore(client, "a b")


@pytest.mark.parametrize("path", PATHS)
def test_tensor_larger_than_three_chunks_round_trips(client: redis.Redis, path: str) -> None:
    blobs = make(client, path)
    x = big_tensor()
    entry, buf = entry_for("w", x)
    assert entry.chunks == 5
    seen: list[int] = []
    assert blobs.upload(entry, buf, seen.append) == entry.nbytes
    assert sum(seen) == entry.nbytes
    names = [keys.blob_key("hotswap", "m", entry.digest, CHUNK, i) for i in range(5)]
    assert sorted(blobs.stored_blob_keys()) == sorted(names)
    assert [client.strlen(n) for n in names] == [CHUNK] * 4 + [40000 - 4 * CHUNK]
    out = read_back(blobs, entry)
    assert bytes(out) == bytes(buf)
    y = codec.from_bytes(out, entry.dtype, entry.shape)
    assert torch.equal(y, x)
    codec.check_digest("w", out, entry.digest, "model 'm' v3")


@pytest.mark.parametrize("path", PATHS)
def test_many_pipeline_batches(
    client: redis.Redis, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = make(client, path)
    _small_batches(monkeypatch)
    entry, buf = entry_for("w", big_tensor(), chunk=1024)
    seen: list[int] = []
    assert blobs.upload(entry, buf, seen.append) == 40000
    assert len(seen) == 20 and sum(seen) == 40000
    assert bytes(read_back(blobs, entry)) == bytes(buf)


def test_odd_tensors_round_trip(blobs: BlobStore) -> None:
    for name, x in {
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "strided": big_tensor(1).t()[::3],
        "bool": torch.tensor([True, False, True]),
    }.items():
        entry, buf = entry_for(name, x, chunk=4096)
        blobs.upload(entry, buf)
        out = read_back(blobs, entry)
        assert bytes(out) == bytes(buf)
        assert torch.equal(codec.from_bytes(out, entry.dtype, entry.shape), x.contiguous())


def test_upload_is_idempotent(blobs: BlobStore, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    blobs.upload(entry, buf)
    before = snapshot(client)
    blobs.upload(entry, buf)
    assert snapshot(client) == before


def test_upload_refuses_a_wrong_length(blobs: BlobStore, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    with pytest.raises(IntegrityError) as e:
        blobs.upload(entry, buf[:-1])
    assert str(e.value) == "tensor 'w': 39999 bytes to upload, manifest says 40000"
    assert snapshot(client) == {}


def test_read_into_refuses_a_wrong_buffer(blobs: BlobStore) -> None:
    entry, buf = entry_for("w", big_tensor())
    blobs.upload(entry, buf)
    with pytest.raises(IntegrityError) as e:
        blobs.read_into(entry, memoryview(bytearray(10)), 3)
    assert str(e.value) == "model 'm' v3 tensor 'w': buffer is 10 bytes, need 40000"


def test_both_paths_write_and_read_the_same_bytes(client: redis.Redis) -> None:
    data = random_bytes(5 * 65536 + 123, 9)
    entry = bytes_entry("w", data, 65536)
    fast, plain = make(client, "fast", "m"), make(client, "pipelined", "p")
    ticks: list[int] = []
    assert fast.upload(entry, memoryview(data), ticks.append) == len(data)
    assert sum(ticks) == len(data)
    plain.upload(entry, memoryview(data))
    for i in range(entry.chunks):
        assert client.get(keys.blob_key("hotswap", "m", entry.digest, 65536, i)) == client.get(
            keys.blob_key("hotswap", "p", entry.digest, 65536, i)
        )
    out_fast, out_plain = bytearray(len(data)), bytearray(len(data))
    fast.read_into(entry, memoryview(out_fast), 1)
    plain.read_into(entry, memoryview(out_plain), 1)
    assert bytes(out_fast) == bytes(out_plain) == data


@pytest.mark.parametrize("path", PATHS)
def test_each_chunk_is_reported_as_it_lands(client: redis.Redis, path: str) -> None:
    blobs = make(client, path)
    data = random_bytes(5 * 65536 + 123, 4)
    entry = bytes_entry("w", data, 65536)
    blobs.upload(entry, memoryview(data))
    out = bytearray(len(data))
    landed: list[tuple[int, int]] = []
    hashing = codec.ChunkDigest(memoryview(out), 65536)

    def seen(i: int, n: int) -> None:
        landed.append((i, n))
        hashing.landed(i, n)

    blobs.read_into(entry, memoryview(out), 1, seen)
    assert landed == [(i, 65536) for i in range(5)] + [(5, 123)]
    assert bytes(out) == data and hashing.hexdigest() == entry.digest


class _Refusing:
    """A fast path that never applies (as a cluster node without a plain connection)."""

    def set_chunks(self, keys: Sequence[str], values: Sequence[memoryview]) -> None:
        raise transport.NotApplicable("no plain connection")

    def get_into(
        self,
        keys: Sequence[str],
        outs: Sequence[memoryview],
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> list[int | None]:
        raise transport.NotApplicable("no plain connection")


def test_not_applicable_falls_back_to_redis_py(blobs: BlobStore) -> None:
    blobs.__dict__["_blob_io"] = _Refusing()
    entry, buf = entry_for("w", big_tensor())
    assert blobs.upload(entry, buf) == entry.nbytes
    assert bytes(read_back(blobs, entry)) == bytes(buf)


# -- the one chunk check ------------------------------------------------------------


def test_chunk_check_names_the_tensor_and_the_chunk() -> None:
    entry, _ = entry_for("w", big_tensor())
    check_chunk("model 'm' v3", entry, 0, CHUNK)
    check_chunk("model 'm' v3", entry, 4, 40000 - 4 * CHUNK)
    with pytest.raises(IntegrityError, match=r"^model 'm' v3 tensor 'w': chunk 4 is 8192 bytes"):
        check_chunk("model 'm' v3", entry, 4, CHUNK)
    with pytest.raises(IntegrityError, match=r"^model 'm' tensor 'w': chunk 1 of 5 is missing"):
        check_chunk("model 'm'", entry, 1, None)


def test_flipped_byte_is_caught_by_the_digest_check(blobs: BlobStore, client: redis.Redis) -> None:
    entry, buf = entry_for("layer.0.weight", big_tensor())
    blobs.upload(entry, buf)
    key = keys.blob_key("hotswap", "m", entry.digest, CHUNK, 2)
    chunk = bytearray(client.get(key) or b"")
    chunk[100] ^= 0x40
    client.set(key, bytes(chunk))
    out = read_back(blobs, entry)  # sizes are right: only the digest can tell
    with pytest.raises(IntegrityError) as e:
        codec.check_digest(entry.name, out, entry.digest, "model 'm' v3")
    message = str(e.value)
    assert message.startswith("model 'm' v3 tensor 'layer.0.weight': bytes hash to ")
    assert "\n" not in message


@pytest.mark.parametrize("path", PATHS)
def test_truncated_chunk_is_an_integrity_error(client: redis.Redis, path: str) -> None:
    blobs = make(client, path)
    entry, buf = entry_for("w", big_tensor())
    blobs.upload(entry, buf)
    client.set(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 2), bytes(buf[:100]))
    with pytest.raises(IntegrityError) as e:
        read_back(blobs, entry, 3)
    assert str(e.value) == (
        "model 'm' v3 tensor 'w': chunk 2 is 100 bytes, expected 8192 (truncated or corrupted)"
    )


@pytest.mark.parametrize("path", PATHS)
def test_overlong_chunk_is_an_integrity_error(client: redis.Redis, path: str) -> None:
    blobs = make(client, path)
    entry, buf = entry_for("w", big_tensor())
    blobs.upload(entry, buf)
    client.append(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 4), b"x")
    with pytest.raises(IntegrityError, match=r"chunk 4 is 7233 bytes, expected 7232"):
        read_back(blobs, entry, 3)
    client.append(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 2), b"extra")
    with pytest.raises(IntegrityError, match=r"chunk 2 is 8197 bytes, expected 8192"):
        read_back(blobs, entry, 3)


@pytest.mark.parametrize("path", PATHS)
def test_missing_chunk_is_an_integrity_error(client: redis.Redis, path: str) -> None:
    blobs = make(client, path)
    entry, buf = entry_for("w", big_tensor())
    blobs.upload(entry, buf)
    client.delete(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 1))
    with pytest.raises(IntegrityError) as e:
        read_back(blobs, entry, 7)
    assert str(e.value) == (
        "model 'm' v7 tensor 'w': chunk 1 of 5 is missing from Redis (collected or lost); "
        "publish again"
    )
    assert client.get(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 4)) == bytes(
        buf[4 * CHUNK :]
    )


@pytest.mark.parametrize("path", PATHS)
def test_stream_yields_the_bytes_in_batches_of_one_reused_buffer(
    client: redis.Redis, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = make(client, path)
    _small_batches(monkeypatch)
    data = random_bytes(40000, seed=3)
    entry = bytes_entry("w", data, 1024)
    blobs.upload(entry, memoryview(data))
    pieces = []
    buffers = set()
    for piece in blobs.stream(entry, 7):
        pieces.append(bytes(piece))
        buffers.add(id(piece.obj))
    assert [len(p) for p in pieces] == [2048] * 19 + [1088]
    assert b"".join(pieces) == data and len(buffers) == 1
    empty = TensorEntry("e", "U8", (0,), 0, codec.digest(b""), 1024, 0.0, 0.0)
    assert list(blobs.stream(empty)) == []


@pytest.mark.parametrize("path", PATHS)
def test_stream_stops_at_the_batch_of_the_first_missing_chunk(
    client: redis.Redis, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = make(client, path)
    _small_batches(monkeypatch)
    data = random_bytes(40000, seed=4)
    entry = bytes_entry("w", data, 1024)
    blobs.upload(entry, memoryview(data))
    client.delete(keys.blob_key("hotswap", "m", entry.digest, 1024, 5))
    got = []
    with pytest.raises(IntegrityError) as e:
        for piece in blobs.stream(entry, 7):
            got.append(bytes(piece))
    assert str(e.value) == (
        "model 'm' v7 tensor 'w': chunk 5 of 40 is missing from Redis (collected or lost); "
        "publish again"
    )
    assert b"".join(got) == data[:4096]  # the two batches before it


def test_failures_on_either_path_are_store_unavailable() -> None:
    with EmbeddedRedis() as srv:
        client = redis.Redis.from_url(srv.url, socket_timeout=1, socket_connect_timeout=0.5)
        data = random_bytes(10_000)
        entry = bytes_entry("w", data, 4096)
        make(client).upload(entry, memoryview(data))
        srv.kill()
        for path in PATHS:
            blobs = BlobStore(client, "m", retrying=operation_retry(2, 0.05))
            if path == "pipelined":
                blobs.__dict__["_blob_io"] = None
            with pytest.raises(StoreUnavailable, match="Redis unreachable while reading tensor"):
                blobs.read_into(entry, memoryview(bytearray(len(data))))
            with pytest.raises(StoreUnavailable, match="Redis unreachable while uploading tensor"):
                blobs.upload(entry, memoryview(data))
        client.close()


# -- which blobs are stored, the index, deletion ------------------------------------


def test_missing_reports_entries_with_absent_chunks(blobs: BlobStore, client: redis.Redis) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    tied = TensorEntry("tied", a.dtype, a.shape, a.nbytes, a.digest, a.chunk_bytes, 0.0, 0.0)
    empty, _ = entry_for("e", torch.empty(0))
    assert blobs.missing([a, b, tied, empty]) == [a, b, tied]
    blobs.upload(a, abuf)
    blobs.upload(b, bbuf)
    assert blobs.missing([a, b, tied, empty]) == []
    client.delete(keys.blob_key("hotswap", "m", b.digest, CHUNK, 3))
    assert blobs.missing([a, b, tied]) == [b]
    # Same bytes under another chunk size are other blobs.
    other = TensorEntry("a", a.dtype, a.shape, a.nbytes, a.digest, 4096, 0.0, 0.0)
    assert blobs.missing([other]) == [other]


def test_missing_counts_expected_blobs_together(blobs: BlobStore, client: redis.Redis) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    c, _ = entry_for("c", big_tensor(3))
    blobs.upload(a, abuf)
    blobs.upload(b, bbuf)
    assert blobs.missing([c], expect_present=[a, b]) == [c]
    assert blobs.missing([], expect_present=[a, b]) == []
    # One chunk of an expected blob gone: found blob by blob.
    client.delete(keys.blob_key("hotswap", "m", b.digest, CHUNK, 4))
    assert blobs.missing([c], expect_present=[a, b]) == [c, b]
    assert blobs.missing([], expect_present=[a, b, c]) == [b, c]


def test_missing_can_touch_in_the_same_round_trip(blobs: BlobStore) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, _ = entry_for("b", big_tensor(2))
    blobs.upload(a, abuf)
    before = time.time()
    assert blobs.missing([a, b], touch=True) == [b]
    scores = blobs.blob_index()
    # Both are indexed, present or not: an upload of b follows, under gc's grace.
    assert set(scores) == {keys.blob_id(a.digest, CHUNK, 5), keys.blob_id(b.digest, CHUNK, 5)}
    assert all(before <= t <= time.time() for t in scores.values())
    c, _ = entry_for("c", big_tensor(3))
    assert blobs.missing([], expect_present=[c], touch=True) == [c]
    assert set(blobs.blob_index()) == set(scores)  # expected blobs are not touched


def test_blob_index_and_deletion(blobs: BlobStore) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    blobs.upload(a, abuf)
    blobs.upload(b, bbuf)
    blobs.touch_blobs([a, b], now=1000.0)
    ida, idb = keys.blob_id(a.digest, CHUNK, 5), keys.blob_id(b.digest, CHUNK, 5)
    assert blobs.blob_index() == {ida: 1000.0, idb: 1000.0}
    blobs.touch_blobs([b], now=2000.0)
    assert blobs.blob_scores([ida, idb, "nope"]) == [1000.0, 2000.0, None]
    assert blobs.blob_scores([]) == []
    assert blobs.delete_blobs([ida]) == 5
    assert blobs.blob_index() == {idb: 2000.0}
    assert blobs.missing([a, b]) == [a]
    assert len(list(blobs.stored_blob_keys())) == 5
    assert blobs.delete_blobs([]) == 0


def test_touch_defaults_to_now(blobs: BlobStore) -> None:
    entry, _ = entry_for("a", big_tensor())
    before = time.time()
    blobs.touch_blobs([entry])
    (score,) = blobs.blob_index().values()
    assert before <= score <= time.time()


def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 2 KiB: writes and reads cut them in ``blobwrite``, frames in ``blobs``."""
    monkeypatch.setattr(blobwrite, "PIPELINE_BYTES", 2 * 1024)
    monkeypatch.setattr(blobs_module, "PIPELINE_BYTES", 2 * 1024)
