"""Bounded work for hostile declared sizes (issue 13, defect 3).

An intruder who can write to Redis writes a manifest whose entries are
well-formed but declare tiny chunks or huge tensors. Before: one-byte chunks
of a 1 MiB live tensor cost 1,048,576 GETs and 440 MB before the refusal, and
``hotswap verify`` allocated every declared byte before reading a chunk (a
64 GiB declaration ended in MemoryError). Requests are counted by Redis itself
(``INFO commandstats``), memory by ``tracemalloc``.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
import torch
from rel_support import MODEL, admin_store, digests, live_copy, settings_for

from hotswap import codec, keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.blobs import STREAM_BYTES
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ValidationError
from hotswap.manifest import MIN_CHUNK_BYTES, Manifest, TensorEntry
from hotswap.store import Store
from publisher import cli, upkeep
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

NS = "hotswap"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def private() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def store(private: EmbeddedRedis) -> Iterator[Store]:
    s = admin_store(private)
    s.client.flushall()
    yield s
    s.client.close()


def gets(client: redis.Redis) -> int:
    """GET commands the server ran since the last ``CONFIG RESETSTAT``."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def forge(store: Store, m: Manifest) -> None:
    """What an intruder with write access does: manifest, head, notice, by hand."""
    c = store.client
    c.set(keys.manifest_key(NS, MODEL, m.version), mf.encode(m))
    c.set(keys.head_key(NS, MODEL), m.version)
    c.publish(
        keys.events_channel(NS, MODEL),
        notice.encode(notice.Notice(MODEL, m.version, "publish", m.lineage)),
    )


def test_tiny_declared_chunks_are_refused_before_any_chunk_is_read(
    private: EmbeddedRedis, store: Store
) -> None:
    cfg = settings_for(private)
    first = {"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(1))}  # 1 MiB
    live = live_copy({"w": torch.zeros(512, 512)})
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        genuine = store.manifest(v1)
        (w,) = genuine.tensors
        other = codec.digest(codec.as_bytes(first["w"] + 1))
        tiny = replace(w, digest=other, chunk_bytes=1)  # 1,048,576 declared chunks
        v2 = store.reserve_version()
        store.client.config_resetstat()
        forge(store, mf.derive(genuine, version=v2, parent=v1, tensors=(tiny,)))
        with pytest.raises(ValidationError) as caught:
            agent.wait_for(v2, 10)
        (reason,) = caught.value.reasons["<manifest>"]
        assert reason == (
            f"manifest of {MODEL} v{v2} tensor 'w': chunk size 1 declares 1048576 chunks; "
            f"hotswap cuts chunks of at least {MIN_CHUNK_BYTES} bytes (one chunk for a "
            "smaller tensor)"
        )
        # Head and the manifest, read by the agent: no chunk of the declared million.
        assert gets(store.client) < 20
        assert agent.applied_version == v1
    assert digests(live) == digests(first)  # still exactly v1's bytes
    assert store.head() == v2  # the intruder's head, left for the operator to see


def huge_entry(nbytes: int, chunk_bytes: int) -> TensorEntry:
    """A U8 tensor of ``nbytes`` whose chunks are nowhere in Redis."""
    return TensorEntry("huge", "U8", (nbytes,), nbytes, "e" * 64, chunk_bytes, 1.0, 1.0)


@pytest.mark.parametrize("declared", [256 * MiB, 64 * 1024 * MiB], ids=["256MiB", "64GiB"])
def test_verify_of_a_huge_declared_tensor_reads_within_bounded_memory(
    private: EmbeddedRedis, store: Store, declared: int
) -> None:
    """verify allocated ``bytearray(entry.nbytes)`` before reading a chunk: 256 MiB here,
    MemoryError for 64 GiB. Now it streams batch by batch and stops at the first gap."""
    with Publisher(MODEL, settings=settings_for(private)) as pub:
        v1 = pub.publish({"w": torch.ones(8)})
    genuine = store.manifest(v1)
    v2 = store.reserve_version()
    forged = mf.derive(
        genuine, version=v2, parent=v1, tensors=(*genuine.tensors, huge_entry(declared, MiB))
    )
    forge(store, forged)
    store.client.config_resetstat()
    tracemalloc.start()
    try:
        report = upkeep.verify(store, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.version == v2 and list(report.bad) == ["huge"]
    assert report.bad["huge"] == (
        f"chunk 0 of {declared // MiB} is missing from Redis (collected or lost); publish again"
    )
    assert report.tensors_checked == 2 and "w" not in report.bad
    assert peak < 2 * STREAM_BYTES
    # One batch of GETs for the huge tensor (it stops at the first missing chunk).
    assert gets(store.client) <= STREAM_BYTES // MiB + 10


def test_verify_streams_a_real_tensor_larger_than_its_buffer(
    private: EmbeddedRedis, store: Store
) -> None:
    """A genuine tensor several stream buffers long verifies, and a flipped byte in its
    last chunk is found, without ever holding the whole tensor."""
    numel = (3 * STREAM_BYTES) // 4 + 123
    state = {"big": torch.arange(numel, dtype=torch.float32)}
    with Publisher(MODEL, settings=settings_for(private, chunk_bytes=MiB)) as pub:
        v1 = pub.publish(state)
    tracemalloc.start()
    try:
        report = upkeep.verify(store, v1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.bytes_checked == numel * 4
    assert peak < 2 * STREAM_BYTES
    (entry,) = store.manifest(v1).tensors
    last = keys.blob_key(NS, MODEL, entry.digest, entry.chunk_bytes, entry.chunks - 1)
    chunk = bytearray(store.client.get(last) or b"")
    chunk[-1] ^= 1
    store.client.set(last, bytes(chunk))
    assert upkeep.verify(store, v1).bad == {"big": "digest mismatch: the stored bytes were altered"}


def test_cli_verify_of_tiny_declared_chunks_fails_before_reading(
    private: EmbeddedRedis, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hotswap verify` of a head declaring 4 MiB in one-byte chunks took 47 s and 1.98 GB."""
    with Publisher(MODEL, settings=settings_for(private)) as pub:
        v1 = pub.publish({"w": torch.ones(8)})
    genuine = store.manifest(v1)
    v2 = store.reserve_version()
    forge(
        store,
        mf.derive(genuine, version=v2, parent=v1, tensors=(huge_entry(4 * MiB, 1),)),
    )
    store.client.config_resetstat()
    code = cli.main(["--redis-url", private.url, "verify", MODEL])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        f"hotswap: error: manifest of {MODEL} v{v2} tensor 'huge': chunk size 1 declares "
        f"4194304 chunks; hotswap cuts chunks of at least {MIN_CHUNK_BYTES} bytes (one chunk "
        "for a smaller tensor)\n"
    )
    assert gets(store.client) < 10
