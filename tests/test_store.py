"""Store against a real redis-server: blobs, commits, log, agents, notices, faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from hotswap import codec, keys
from hotswap import status as status_module
from hotswap import store as store_module
from hotswap.connection import connect, operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    NotFound,
    SignatureError,
    StoreUnavailable,
    VersionConflict,
)
from hotswap.manifest import Manifest, TensorEntry, encode
from hotswap.settings import HotswapSettings
from hotswap.store import Store

CHUNK = 8192
LINEAGE = "ab" * 16


def entry_for(
    name: str, tensor: torch.Tensor, chunk: int = CHUNK
) -> tuple[TensorEntry, memoryview]:
    buf = codec.as_bytes(tensor)
    s = codec.stats(tensor)
    entry = TensorEntry(
        name,
        codec.dtype_name(tensor.dtype),
        tuple(tensor.shape),
        len(buf),
        codec.digest(buf),
        chunk,
        s.norm,
        s.max_abs,
    )
    return entry, buf


def big_tensor(seed: int = 0) -> torch.Tensor:
    # 10,000 float32 = 40,000 bytes = 5 chunks of 8 KiB (the last one short).
    g = torch.Generator().manual_seed(seed)
    return torch.randn(100, 100, generator=g)


def manifest(version: int, parent: int | None, tensors: tuple[TensorEntry, ...] = ()) -> Manifest:
    return Manifest("m", version, parent, LINEAGE, tensors, created=float(version))


def commit(store: Store, m: Manifest, key: bytes | None = None) -> bytes:
    data = encode(m, key)
    store.commit(m, data, {"version": m.version, "kind": m.kind}, b"notice-%d" % m.version)
    return data


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key of model m with its serialized value."""
    found: dict[bytes, bytes | None] = {}
    for pattern in keys.namespace_pattern("hotswap", "m"):
        for k in client.scan_iter(match=pattern):
            found[k] = client.dump(k)
    return found


def read_back(store: Store, entry: TensorEntry, version: int | None = 3) -> bytearray:
    out = bytearray(entry.nbytes)
    store.read_into(entry, memoryview(out), version)
    return out


# -- blobs -----------------------------------------------------------------------


def test_tensor_larger_than_three_chunks_round_trips(store: Store, client: redis.Redis) -> None:
    x = big_tensor()
    entry, buf = entry_for("w", x)
    assert entry.chunks == 5
    seen: list[int] = []
    assert store.upload(entry, buf, seen.append) == entry.nbytes
    assert sum(seen) == entry.nbytes
    names = [keys.blob_key("hotswap", "m", entry.digest, CHUNK, i) for i in range(5)]
    assert sorted(store.stored_blob_keys()) == sorted(names)
    assert [client.strlen(n) for n in names] == [CHUNK] * 4 + [40000 - 4 * CHUNK]
    out = read_back(store, entry)
    assert bytes(out) == bytes(buf)
    y = codec.from_bytes(out, entry.dtype, entry.shape)
    assert torch.equal(y, x)
    codec.check_digest("w", out, entry.digest, "model 'm' v3")


def test_many_pipeline_batches(
    store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PIPELINE_BYTES", 2 * 1024)
    entry, buf = entry_for("w", big_tensor(), chunk=1024)
    seen: list[int] = []
    assert store.upload(entry, buf, seen.append) == 40000
    assert len(seen) == 20 and sum(seen) == 40000
    assert bytes(read_back(store, entry)) == bytes(buf)


def test_odd_tensors_round_trip(store: Store) -> None:
    for name, x in {
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "strided": big_tensor(1).t()[::3],
        "bool": torch.tensor([True, False, True]),
    }.items():
        entry, buf = entry_for(name, x, chunk=4096)
        store.upload(entry, buf)
        out = read_back(store, entry)
        assert bytes(out) == bytes(buf)
        assert torch.equal(codec.from_bytes(out, entry.dtype, entry.shape), x.contiguous())


def test_upload_is_idempotent(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    before = snapshot(client)
    store.upload(entry, buf)
    assert snapshot(client) == before


def test_upload_refuses_a_wrong_length(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    with pytest.raises(IntegrityError) as e:
        store.upload(entry, buf[:-1])
    assert str(e.value) == "tensor 'w': 39999 bytes to upload, manifest says 40000"
    assert snapshot(client) == {}


def test_read_into_refuses_a_wrong_buffer(store: Store) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    with pytest.raises(IntegrityError) as e:
        store.read_into(entry, memoryview(bytearray(10)), 3)
    assert str(e.value) == "model 'm' v3 tensor 'w': buffer is 10 bytes, need 40000"


def test_missing_reports_entries_with_absent_chunks(store: Store, client: redis.Redis) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    tied = TensorEntry("tied", a.dtype, a.shape, a.nbytes, a.digest, a.chunk_bytes, 0.0, 0.0)
    empty, _ = entry_for("e", torch.empty(0))
    assert store.missing([a, b, tied, empty]) == [a, b, tied]
    store.upload(a, abuf)
    store.upload(b, bbuf)
    assert store.missing([a, b, tied, empty]) == []
    client.delete(keys.blob_key("hotswap", "m", b.digest, CHUNK, 3))
    assert store.missing([a, b, tied]) == [b]
    # Same bytes under another chunk size are other blobs.
    other = TensorEntry("a", a.dtype, a.shape, a.nbytes, a.digest, 4096, 0.0, 0.0)
    assert store.missing([other]) == [other]


def test_missing_counts_expected_blobs_together(store: Store, client: redis.Redis) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    c, _ = entry_for("c", big_tensor(3))
    store.upload(a, abuf)
    store.upload(b, bbuf)
    assert store.missing([c], expect_present=[a, b]) == [c]
    assert store.missing([], expect_present=[a, b]) == []
    # One chunk of an expected blob gone: found blob by blob.
    client.delete(keys.blob_key("hotswap", "m", b.digest, CHUNK, 4))
    assert store.missing([c], expect_present=[a, b]) == [c, b]
    assert store.missing([], expect_present=[a, b, c]) == [b, c]


def test_missing_can_touch_in_the_same_round_trip(store: Store) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, _ = entry_for("b", big_tensor(2))
    store.upload(a, abuf)
    before = time.time()
    assert store.missing([a, b], touch=True) == [b]
    scores = store.blob_index()
    # Both are indexed, present or not: an upload of b follows, under gc's grace.
    assert set(scores) == {keys.blob_id(a.digest, CHUNK, 5), keys.blob_id(b.digest, CHUNK, 5)}
    assert all(before <= t <= time.time() for t in scores.values())
    c, _ = entry_for("c", big_tensor(3))
    assert store.missing([], expect_present=[c], touch=True) == [c]
    assert set(store.blob_index()) == set(scores)  # expected blobs are not touched


def test_flipped_byte_is_caught_by_the_digest_check(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("layer.0.weight", big_tensor())
    store.upload(entry, buf)
    key = keys.blob_key("hotswap", "m", entry.digest, CHUNK, 2)
    chunk = bytearray(client.get(key) or b"")
    chunk[100] ^= 0x40
    client.set(key, bytes(chunk))
    out = read_back(store, entry)  # sizes are right: only the digest can tell
    with pytest.raises(IntegrityError) as e:
        codec.check_digest(entry.name, out, entry.digest, "model 'm' v3")
    message = str(e.value)
    assert message.startswith("model 'm' v3 tensor 'layer.0.weight': bytes hash to ")
    assert "\n" not in message


def test_truncated_chunk_is_an_integrity_error(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    client.set(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 2), bytes(buf[:100]))
    with pytest.raises(IntegrityError) as e:
        read_back(store, entry, 3)
    assert str(e.value) == (
        "model 'm' v3 tensor 'w': chunk 2 is 100 bytes, expected 8192 (truncated or corrupted)"
    )


def test_overlong_last_chunk_is_an_integrity_error(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    client.append(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 4), b"x")
    with pytest.raises(IntegrityError, match=r"chunk 4 is 7233 bytes, expected 7232"):
        read_back(store, entry, 3)


def test_missing_chunk_is_an_integrity_error(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    client.delete(keys.blob_key("hotswap", "m", entry.digest, CHUNK, 1))
    with pytest.raises(IntegrityError) as e:
        read_back(store, entry, 7)
    assert str(e.value) == (
        "model 'm' v7 tensor 'w': chunk 1 of 5 is missing from Redis (collected or lost); "
        "publish again"
    )


def test_blob_index_and_deletion(store: Store, client: redis.Redis) -> None:
    a, abuf = entry_for("a", big_tensor(1))
    b, bbuf = entry_for("b", big_tensor(2))
    store.upload(a, abuf)
    store.upload(b, bbuf)
    store.touch_blobs([a, b], now=1000.0)
    ida, idb = keys.blob_id(a.digest, CHUNK, 5), keys.blob_id(b.digest, CHUNK, 5)
    assert store.blob_index() == {ida: 1000.0, idb: 1000.0}
    store.touch_blobs([b], now=2000.0)
    assert store.blob_scores([ida, idb, "nope"]) == [1000.0, 2000.0, None]
    assert store.blob_scores([]) == []
    assert store.delete_blobs([ida]) == 5
    assert store.blob_index() == {idb: 2000.0}
    assert store.missing([a, b]) == [a]
    assert len(list(store.stored_blob_keys())) == 5
    assert store.delete_blobs([]) == 0


def test_touch_defaults_to_now(store: Store) -> None:
    entry, _ = entry_for("a", big_tensor())
    before = time.time()
    store.touch_blobs([entry])
    (score,) = store.blob_index().values()
    assert before <= score <= time.time()


# -- versions and commits --------------------------------------------------------


def test_commit_moves_head_and_writes_everything(store: Store, client: redis.Redis) -> None:
    sub = store.subscribe()
    try:
        assert store.head() is None and store.head_manifest() is None
        assert store.reserve_version() == 1
        data = commit(store, manifest(1, None))
        assert store.head() == 1
        assert store.manifest_bytes(1) == data
        assert store.manifest(1) == manifest(1, None)
        assert sub.get(timeout=2.0) == b"notice-1"
        assert store.log() == [
            {"version": "1", "kind": "publish", "id": store.log()[0]["id"]},
        ]
    finally:
        sub.close()


def test_versions_log_and_manifests(store: Store) -> None:
    for v in (1, 2, 3):
        assert store.reserve_version() == v
        commit(store, manifest(v, v - 1 if v > 1 else None))
    assert store.versions() == [1, 2, 3]
    assert store.head_manifest() == manifest(3, 2)
    assert [row["version"] for row in store.log()] == ["3", "2", "1"]
    assert [row["version"] for row in store.log(count=2)] == ["3", "2"]
    store.append_log({"kind": "gc", "deleted": 0})
    assert store.log(count=1)[0]["kind"] == "gc"
    assert store.delete_manifests([1, 2]) == 2
    assert store.delete_manifests([]) == 0
    assert store.versions() == [3]
    with pytest.raises(NotFound) as e:
        store.manifest(1)
    assert str(e.value) == "model 'm' has no version 1 (unknown or collected)"


def test_stale_parent_is_a_conflict_that_changes_nothing(store: Store, client: redis.Redis) -> None:
    commit(store, manifest(1, None))
    commit(store, manifest(2, 1))
    before = snapshot(client)
    sub = store.subscribe()
    try:
        with pytest.raises(VersionConflict) as e:
            commit(store, manifest(3, 1))  # read head at v1; v2 landed since
        assert str(e.value) == (
            "model 'm': head is v2, not v1 as this publish read it; "
            "another publisher committed first, publish again on top of it"
        )
        assert sub.get(timeout=0.3) is None
    finally:
        sub.close()
    assert snapshot(client) == before
    assert store.head() == 2
    assert client.get(keys.manifest_key("hotswap", "m", 3)) is None


def test_first_publish_racing_another_is_a_conflict(store: Store, client: redis.Redis) -> None:
    commit(store, manifest(1, None))
    before = snapshot(client)
    with pytest.raises(VersionConflict, match=r"head is v1, not empty as this publish read it"):
        commit(store, manifest(2, None))
    assert snapshot(client) == before


def test_committing_an_existing_version_number_fails(store: Store, client: redis.Redis) -> None:
    commit(store, manifest(1, None))
    commit(store, manifest(2, 1))
    before = snapshot(client)
    other = Manifest("m", 2, 2, LINEAGE, (), message="other bytes")
    with pytest.raises(VersionConflict) as e:
        commit(store, other)
    assert str(e.value) == ("model 'm': v2 is not newer than head v2; reserve a new version number")
    # A manifest left at v3 (e.g. restored by hand) is never overwritten.
    client.set(keys.manifest_key("hotswap", "m", 3), b"precious")
    before = snapshot(client)
    with pytest.raises(VersionConflict) as e:
        commit(store, manifest(3, 2))
    assert str(e.value) == "model 'm' v3 already exists; versions are immutable"
    assert snapshot(client) == before


def test_commit_retried_after_a_lost_reply_is_idempotent(store: Store, client: redis.Redis) -> None:
    commit(store, manifest(1, None))
    m2 = manifest(2, 1)
    data = commit(store, m2)
    before = snapshot(client)
    assert commit(store, m2) == data  # same bytes again: recognised, no error
    assert snapshot(client) == before
    assert client.xlen(keys.log_key("hotswap", "m")) == 2
    # Still recognised after another publish moved head on.
    commit(store, manifest(3, 2))
    commit(store, m2)
    assert store.head() == 3


def test_signed_manifest_through_the_store(store: Store) -> None:
    commit(store, manifest(1, None), key=b"k2")
    assert store.manifest(1, [b"k1", b"k2"]).version == 1
    with pytest.raises(SignatureError, match=r"^manifest of m v1 is signed with unknown key id"):
        store.manifest(1, [b"k1"])
    assert store.head_manifest([b"k2"]) == manifest(1, None)


def test_manifest_under_the_wrong_key_is_refused(store: Store, client: redis.Redis) -> None:
    client.set(keys.manifest_key("hotswap", "m", 5), encode(manifest(4, 3)))
    with pytest.raises(FormatError) as e:
        store.manifest(5)
    assert str(e.value) == "manifest of m v5: says it is version 4"


def test_head_and_the_guessed_manifest_in_one_read(store: Store, client: redis.Redis) -> None:
    assert store.head_and_manifest_bytes(None) == (None, None)
    assert store.head_and_manifest_bytes(1) == (None, None)
    data1 = commit(store, manifest(1, None))
    assert store.head_and_manifest_bytes(1) == (1, data1)
    assert store.head_and_manifest_bytes(None) == (1, None)
    commit(store, manifest(2, 1))
    # A wrong guess gives head only (v1's bytes exist, but v1 is not head).
    assert store.head_and_manifest_bytes(1) == (2, None)
    assert store.manifest(1, data=data1) == manifest(1, None)
    client.set(keys.head_key("hotswap", "m"), b"banana")
    with pytest.raises(FormatError, match="head holds b'banana'"):
        store.head_and_manifest_bytes(2)


def test_garbled_head_is_a_format_error(store: Store, client: redis.Redis) -> None:
    client.set(keys.head_key("hotswap", "m"), b"banana")
    with pytest.raises(FormatError) as e:
        store.head()
    assert str(e.value) == (
        "model 'm': head holds b'banana', not a version number; "
        "someone wrote it by hand: set it to a stored version"
    )


# -- agents, notices, cleanup ----------------------------------------------------


def test_agent_records_and_heartbeats(store: Store) -> None:
    store.write_agent_status("a1", b"status-1", ttl=30)
    store.write_agent_status("a2", b"status-2", ttl=0.05)
    time.sleep(0.2)
    assert store.agent_records() == [("a1", b"status-1", True), ("a2", b"status-2", False)]
    store.remove_agent("a1")
    assert store.agent_records() == [("a2", b"status-2", False)]


def test_hostile_agent_records_are_listed_not_fatal(store: Store, client: redis.Redis) -> None:
    # The agent ACL user may write any field of the agents hash: a non-UTF-8
    # name, an id no heartbeat key can have, a value far over the record limit.
    agents = keys.agents_key("hotswap", "m")
    store.write_agent_status("ok", b"status-ok", ttl=30)
    client.hset(agents, b"\xff\xfe", b"x")
    client.hset(agents, "bad id/with:colon", b"y")
    client.hset(agents, "huge", b"z" * (store_module.MAX_STATUS_BYTES + 1))
    assert store.agent_records() == [
        ("bad id/with:colon", b"y", False),
        ("huge", b"", False),
        ("ok", b"status-ok", True),
        ("\\xff\\xfe", b"x", False),
    ]
    with pytest.raises(FormatError) as e:
        status_module.decode(b"")
    assert str(e.value) == "agent status is empty or over the 262144-byte limit"
    assert client.hlen(agents) == 4


def test_subscription_times_out_with_none(store: Store) -> None:
    sub = store.subscribe()
    try:
        started = time.monotonic()
        assert sub.get(timeout=0.2) is None
        assert time.monotonic() - started < 2.0
    finally:
        sub.close()
    sub.close()  # closing twice is harmless


def test_delete_all_removes_only_this_model(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    store.touch_blobs([entry])
    commit(store, manifest(1, None))
    other = Store(client, "m2")
    other.upload(entry, buf)
    other.reserve_version()
    kept = snapshot_of(client, "m2")
    assert store.delete_all() == 5 + 4  # chunks; head, manifest:1, log, blob index
    assert snapshot(client) == {}
    assert snapshot_of(client, "m2") == kept


def snapshot_of(client: redis.Redis, model: str) -> dict[bytes, bytes | None]:
    found: dict[bytes, bytes | None] = {}
    for pattern in keys.namespace_pattern("hotswap", model):
        for k in client.scan_iter(match=pattern):
            found[k] = client.dump(k)
    return found


def test_store_refuses_bad_names(client: redis.Redis) -> None:
    with pytest.raises(ConfigError, match=r"^invalid model name 'a b'"):
        Store(client, "a b")
    with pytest.raises(ConfigError, match=r"^invalid namespace 'x:y'"):
        Store(client, "m", namespace="x:y")


# -- faults: a server of our own, killed, frozen, or refusing us ----------------


@pytest.fixture
def own_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persist=True) as server:
        yield server


def client_for(url: str, socket_timeout: float = 1.0) -> redis.Redis:
    settings = HotswapSettings(
        redis_url=url,
        socket_timeout=socket_timeout,
        connect_timeout=0.5,
        _env_file=None,  # type: ignore[call-arg]
    )
    c: redis.Redis = connect(settings)
    return c


@pytest.mark.reliability
def test_killed_server_restarted_during_a_call_is_retried(own_server: EmbeddedRedis) -> None:
    c = client_for(own_server.url)
    store = Store(c, "m", retrying=operation_retry(attempts=40, max_wait=0.2))
    entry, buf = entry_for("w", big_tensor())
    store.upload(entry, buf)
    commit(store, manifest(1, None))
    own_server.kill()
    restarter = threading.Timer(0.3, own_server.restart)
    restarter.start()
    try:
        started = time.monotonic()
        assert store.head() == 1  # the AOF brought it back
        assert time.monotonic() - started >= 0.25
    finally:
        restarter.join()
    assert bytes(read_back(store, entry, 1)) == bytes(buf)
    c.close()


@pytest.mark.reliability
def test_dead_server_gives_store_unavailable_after_the_budget(own_server: EmbeddedRedis) -> None:
    c = client_for(own_server.url)
    store = Store(c, "m", retrying=operation_retry(attempts=4, max_wait=0.2))
    assert store.head() is None
    own_server.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as e:
        store.head()
    elapsed = time.monotonic() - started
    message = str(e.value)
    assert message.startswith("Redis unreachable while reading head for model 'm' (ConnectionError")
    assert message.endswith("; check HOTSWAP_REDIS_URL and the server")
    assert "\n" not in message
    # Three backoffs of at most 0.2 s: it tried, then gave up, not forever.
    assert 0.05 < elapsed < 3.0
    assert isinstance(e.value.__cause__, redis.ConnectionError)
    c.close()


@pytest.mark.reliability
def test_frozen_server_hits_the_socket_timeout(own_server: EmbeddedRedis) -> None:
    c = client_for(own_server.url, socket_timeout=0.3)
    store = Store(c, "m", retrying=operation_retry(attempts=2, max_wait=0.1))
    assert store.head() is None
    own_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as e:
            store.head()
        elapsed = time.monotonic() - started
    finally:
        own_server.thaw()
    assert str(e.value).startswith("Redis unreachable while reading head for model 'm' (Timeout")
    assert 0.5 < elapsed < 3.0  # two attempts of 0.3 s each
    assert store.head() is None  # thawed: works again
    c.close()


@pytest.mark.reliability
def test_acl_failures_are_config_errors_not_retried(own_server: EmbeddedRedis) -> None:
    admin = redis.Redis.from_url(own_server.url)
    admin.acl_setuser(
        "reader", enabled=True, passwords=["+right"], keys=["*"], commands=["+get", "+ping"]
    )
    admin.close()
    host = f"127.0.0.1:{own_server.port}"
    slow_retry = operation_retry(attempts=5, max_wait=2.0)

    wrong = client_for(f"redis://reader:wrong@{host}/0")
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        Store(wrong, "m", retrying=slow_retry).head()
    assert time.monotonic() - started < 0.5  # not retried
    assert str(e.value).startswith("Redis refused the credentials while reading head: ")
    wrong.close()

    reader = client_for(f"redis://reader:right@{host}/0")
    store = Store(reader, "m", retrying=slow_retry)
    assert store.head() is None
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        store.reserve_version()
    assert time.monotonic() - started < 0.5
    assert str(e.value).startswith(
        "Redis user may not do this while reserving a version for model 'm': "
    )
    reader.close()
