"""Store against a real redis-server: commits, log, agents, notices, faults.

Blob I/O (``Store.blobs``) is tests/test_blobs.py's. Nothing here reads a
clock: waits are for events or count attempts, and the retry tests count
the attempts the policy made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
import tenacity
from blob_support import big_tensor, entry_for, snapshot
from polling import until

from hotswap import keys
from hotswap import status as status_module
from hotswap import store as store_module
from hotswap.connection import connect, operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import (
    ConfigError,
    FormatError,
    NotFound,
    SignatureError,
    StoreUnavailable,
    VersionConflict,
)
from hotswap.manifest import Manifest, TensorEntry, encode
from hotswap.settings import HotswapSettings
from hotswap.store import Store

LINEAGE = "ab" * 16


def manifest(version: int, parent: int | None, tensors: tuple[TensorEntry, ...] = ()) -> Manifest:
    return Manifest("m", version, parent, LINEAGE, tensors, created=float(version))


def commit(store: Store, m: Manifest, key: bytes | None = None) -> bytes:
    data = encode(m, key)
    store.commit(m, data, {"version": m.version, "kind": m.kind}, b"notice-%d" % m.version)
    return data


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
        # A marker published after the failed commit arrives first: no notice went out.
        client.publish(keys.events_channel("hotswap", "m"), b"marker")
        assert sub.get(timeout=5.0) == b"marker"
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
    beat = keys.heartbeat_key("hotswap", "m", "a2")
    assert until(lambda: not store.client.exists(beat), attempts=500), "heartbeat never expired"
    assert store.agent_records() == [("a1", b"status-1", True), ("a2", b"status-2", False)]
    store.remove_agent("a1")
    assert store.agent_records() == [("a2", b"status-2", False)]


def test_hostile_agent_records_are_listed_not_fatal(store: Store, client: redis.Redis) -> None:
    # An older agent ACL user may write any field of the agents hash: a non-UTF-8
    # name, an id no heartbeat key can have, a value far over the record limit.
    agents = keys.agents_key("hotswap", "m")
    store.write_agent_status("ok", b"status-ok", ttl=30)
    client.hset(agents, b"\xff\xfe", b"x")
    client.hset(agents, "bad id/with:colon", b"y")
    client.hset(agents, "huge", b"z" * (store_module.MAX_STATUS_BYTES + 1))
    assert store.agent_records() == [  # by agent id as shown
        ("\\xff\\xfe", b"x", False),
        ("bad id/with:colon", b"y", False),
        ("huge", b"", False),
        ("ok", b"status-ok", True),
    ]
    with pytest.raises(FormatError) as e:
        status_module.decode(b"")
    assert str(e.value) == "agent status is empty or over the 262144-byte limit"
    assert client.hlen(agents) == 3  # older agents' hash: read, never written


def test_subscription_times_out_with_none(store: Store) -> None:
    sub = store.subscribe()
    try:
        assert sub.get(timeout=0.2) is None
    finally:
        sub.close()
    sub.close()  # closing twice is harmless


def test_delete_all_removes_only_this_model(store: Store, client: redis.Redis) -> None:
    entry, buf = entry_for("w", big_tensor())
    store.blobs.upload(entry, buf)
    store.blobs.touch_blobs([entry])
    commit(store, manifest(1, None))
    other = Store(client, "m2")
    other.blobs.upload(entry, buf)
    other.reserve_version()
    kept = snapshot(client, "m2")
    assert store.delete_all() == 5 + 4  # chunks; head, manifest:1, log, blob index
    assert snapshot(client) == {}
    assert snapshot(client, "m2") == kept


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


def counted(
    attempts: int,
    max_wait: float,
    before_sleep: Callable[[tenacity.RetryCallState], None] = tenacity.before_sleep_nothing,
) -> tuple[tenacity.Retrying, list[int]]:
    """The store's retry policy, noting the number of each attempt it makes."""
    tried: list[int] = []
    policy = operation_retry(attempts, max_wait).copy(
        before=lambda state: tried.append(state.attempt_number), before_sleep=before_sleep
    )
    return policy, tried


@pytest.mark.reliability
def test_killed_server_restarted_during_a_call_is_retried(own_server: EmbeddedRedis) -> None:
    def restart_once(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            own_server.restart()

    c = client_for(own_server.url)
    policy, tried = counted(40, 0.2, before_sleep=restart_once)
    store = Store(c, "m", retrying=policy)
    entry, buf = entry_for("w", big_tensor())
    store.blobs.upload(entry, buf)
    commit(store, manifest(1, None))
    tried.clear()
    own_server.kill()
    assert store.head() == 1  # the AOF brought it back
    assert tried[:2] == [1, 2]  # refused first, retried once the server was back
    out = bytearray(entry.nbytes)
    store.blobs.read_into(entry, memoryview(out), 1)
    assert bytes(out) == bytes(buf)
    c.close()


@pytest.mark.reliability
def test_dead_server_gives_store_unavailable_after_the_budget(own_server: EmbeddedRedis) -> None:
    c = client_for(own_server.url)
    policy, tried = counted(4, 0.2)
    store = Store(c, "m", retrying=policy)
    assert store.head() is None
    own_server.kill()
    tried.clear()
    with pytest.raises(StoreUnavailable) as e:
        store.head()
    message = str(e.value)
    assert message.startswith("Redis unreachable while reading head for model 'm' (ConnectionError")
    assert message.endswith("; check HOTSWAP_REDIS_URL and the server")
    assert "\n" not in message
    assert tried == [1, 2, 3, 4]  # it tried the whole budget, then gave up, not forever
    assert isinstance(e.value.__cause__, redis.ConnectionError)
    c.close()


@pytest.mark.reliability
def test_frozen_server_hits_the_socket_timeout(own_server: EmbeddedRedis) -> None:
    c = client_for(own_server.url, socket_timeout=0.3)
    policy, tried = counted(2, 0.1)
    store = Store(c, "m", retrying=policy)
    assert store.head() is None
    own_server.freeze()
    tried.clear()
    try:
        with pytest.raises(StoreUnavailable) as e:
            store.head()
    finally:
        own_server.thaw()
    assert str(e.value).startswith("Redis unreachable while reading head for model 'm' (Timeout")
    assert isinstance(e.value.__cause__, redis.TimeoutError)
    assert tried == [1, 2]  # each attempt ran into the socket timeout
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
    policy, tried = counted(5, 2.0)

    wrong = client_for(f"redis://reader:wrong@{host}/0")
    with pytest.raises(ConfigError) as e:
        Store(wrong, "m", retrying=policy).head()
    assert tried == [1]  # not retried
    assert str(e.value).startswith("Redis refused the credentials while reading head: ")
    wrong.close()

    reader = client_for(f"redis://reader:right@{host}/0")
    store = Store(reader, "m", retrying=policy)
    assert store.head() is None
    tried.clear()
    with pytest.raises(ConfigError) as e:
        store.reserve_version()
    assert tried == [1]
    assert str(e.value).startswith(
        "Redis user may not do this while reserving a version for model 'm': "
    )
    reader.close()
