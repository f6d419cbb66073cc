"""Blob chunks from replicas, and WAIT before and after a commit, on a real primary and replica.

The replica is a ``redis-server --replicaof`` of the primary. It is made to lag
with ``CLIENT PAUSE WRITE`` on the replica: it stops applying the replication
stream (and acknowledging it) while it keeps serving reads, as a replica
behind its primary does. Every test starts with the replica caught up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from replica_worker import applied, fingerprint, launch, tensors
from waiting import poll

from hotswap import codec, keys
from hotswap.embedded import EmbeddedRedis, free_port
from hotswap.errors import ConfigError, StoreUnavailable
from hotswap.manifest import Manifest
from hotswap.replicas import REST_SECONDS, ReplicaReads, runs
from hotswap.replication import Replication
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "replica_worker.py"
CHANGED = {"layer0.weight", "layer3.weight"}


@dataclass
class Pair:
    primary: EmbeddedRedis
    replica: EmbeddedRedis

    def client(self, node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=10)

    def catch_up(self) -> None:
        """Let the replica apply and acknowledge everything the primary wrote."""
        with self.client(self.replica) as r:
            r.execute_command("CLIENT", "UNPAUSE")
        with self.client(self.primary) as p:
            acked = p.pipeline(transaction=False).set("sync", 1).execute_command("WAIT", 1, 0)
            assert acked.execute()[1] == 1

    def lag(self) -> None:
        """From now on the replica serves reads but applies no write (until ``catch_up``)."""
        with self.client(self.replica) as r:
            r.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")

    def calls(self, node: EmbeddedRedis, command: str) -> int:
        with self.client(node) as c:
            stats: dict[str, Any] = c.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    primary = EmbeddedRedis().start()
    replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        link = redis.Redis(port=replica.port)
        assert poll(lambda: link.info("replication").get("master_link_status") == "up", 1500)
        link.close()
        yield Pair(primary, replica)
    finally:
        replica.stop()
        primary.stop()


@pytest.fixture
def fresh(pair: Pair) -> Iterator[Pair]:
    pair.catch_up()
    with pair.client(pair.primary) as p:
        p.flushall()
        p.execute_command("CONFIG", "RESETSTAT")
    with pair.client(pair.replica) as r:
        r.execute_command("CONFIG", "RESETSTAT")
    pair.catch_up()
    yield pair
    pair.catch_up()


def settings_for(pair: Pair, **values: Any) -> HotswapSettings:
    values.setdefault("deltas", False)  # full blobs: every changed tensor read chunk by chunk
    return HotswapSettings(
        redis_url=pair.primary.url,
        chunk_bytes=4096,
        retry_attempts=2,
        _env_file=None,  # type: ignore[call-arg]
        **values,
    )


def chunk_names(store: Store, m: Manifest, names: set[str] | None = None) -> list[str]:
    return [
        k
        for e in m.tensors
        if names is None or e.name in names
        for k in keys.chunk_keys(store.ns, store.model, e.digest, e.chunk_bytes, e.chunks)
    ]


def read_all(store: Store, m: Manifest) -> dict[str, bytes]:
    """Every tensor's bytes as ``store.blobs`` reads them, each checked against its digest."""
    out = {}
    for e in m.tensors:
        buf = bytearray(e.nbytes)
        store.blobs.read_into(e, memoryview(buf), m.version)
        codec.check_digest(e.name, buf, e.digest, "test")
        out[e.name] = bytes(buf)
    return out


def published(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: bytes(codec.as_bytes(v)) for k, v in state.items()}


# -- replica reads --------------------------------------------------------------------


def test_a_lagging_replica_serves_what_it_has_and_the_primary_the_rest(fresh: Pair) -> None:
    s = settings_for(fresh, read_from_replicas=True, replica_urls=fresh.replica.url)
    with Publisher("m", settings=s) as pub:
        pub.publish(tensors(1))
        fresh.catch_up()
        fresh.lag()
        v2 = pub.publish(tensors(2, CHANGED, base=1))
    client = fresh.client(fresh.primary)
    store = Store.from_settings(client, "m", s)
    m = store.manifest(v2)
    new, old = (
        chunk_names(store, m, CHANGED),
        chunk_names(store, m, {e.name for e in m.tensors} - CHANGED),
    )
    with fresh.client(fresh.replica) as r:  # the replica is behind: v2's new chunks are not there
        assert r.exists(*new) == 0 and r.exists(*old) == len(old)
    store.blobs.replicas = ReplicaReads.of(client, s)
    assert store.blobs.replicas is not None
    gets = fresh.calls(fresh.primary, "get"), fresh.calls(fresh.replica, "get")

    assert read_all(store, m) == published(tensors(2, CHANGED, base=1))
    counts = store.blobs.replicas.counts
    assert (counts.chunks, counts.fallbacks, counts.failures) == (len(old), len(new), 0)
    # The replica was asked for every chunk; the primary only for those it lacked.
    assert fresh.calls(fresh.replica, "get") - gets[1] == len(old) + len(new)
    assert fresh.calls(fresh.primary, "get") - gets[0] == len(new)
    store.blobs.replicas.close()
    client.close()


def test_a_chunk_of_the_wrong_length_on_a_replica_is_read_from_the_primary(fresh: Pair) -> None:
    s = settings_for(fresh)
    with Publisher("m", settings=s) as pub:
        v1 = pub.publish(tensors(1))
    client = fresh.client(fresh.primary)
    store = Store.from_settings(client, "m", s)
    m = store.manifest(v1)
    entry = m.tensors[0]
    names = chunk_names(store, m, {entry.name})
    with EmbeddedRedis() as stray, fresh.client(stray) as other:
        # A server holding the entry's chunks, one of them cut short.
        for name in names:
            other.set(name, client.get(name) or b"")
        other.set(names[1], (client.get(names[1]) or b"")[:-1])
        reads = ReplicaReads.of(
            client, s.model_copy(update={"read_from_replicas": True, "replica_urls": stray.url})
        )
        assert reads is not None
        store.blobs.replicas = reads
        buf = bytearray(entry.nbytes)
        store.blobs.read_into(entry, memoryview(buf), v1)
        reads.close()
    assert bytes(buf) == published(tensors(1))[entry.name]
    assert (reads.counts.chunks, reads.counts.fallbacks) == (len(names) - 1, 1)
    assert len(names) > 2 and runs([0, 1, 2, 5, 7, 8]) == [range(0, 3), range(5, 6), range(7, 9)]
    client.close()


def test_a_replica_that_is_away_costs_a_fallback_not_an_error(fresh: Pair) -> None:
    away = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    s = settings_for(fresh, read_from_replicas=True, replica_urls=away, connect_timeout=1)
    with Publisher("m", settings=s) as pub:
        v1 = pub.publish(tensors(1))
    client = fresh.client(fresh.primary)
    store = Store.from_settings(client, "m", s)
    store.blobs.replicas = ReplicaReads.of(client, s)
    assert store.blobs.replicas is not None
    m = store.manifest(v1)
    assert read_all(store, m) == published(tensors(1))
    counts = store.blobs.replicas.counts
    # One failed attempt, then the replicas rest: every chunk came from the primary.
    assert (counts.failures, counts.chunks) == (1, 0)
    assert counts.fallbacks == len(chunk_names(store, m))
    # Once the rest is over (as if 5 s had passed), a second failure in a row rests twice as long.
    store.blobs.replicas._resting_until = 0.0
    assert read_all(store, m) == published(tensors(1)) and counts.failures == 2
    assert store.blobs.replicas._resting_until > time.monotonic() + REST_SECONDS
    store.blobs.replicas.close()
    client.close()


def test_replica_reads_on_one_server_need_the_replicas_named(fresh: Pair) -> None:
    s = settings_for(fresh, read_from_replicas=True)
    with fresh.client(fresh.primary) as client:
        with pytest.raises(ConfigError) as caught:
            ReplicaReads.of(client, s)
        assert ReplicaReads.of(client, settings_for(fresh)) is None
    assert str(caught.value) == (
        "HOTSWAP_READ_FROM_REPLICAS is on, but this Redis is one server and no replica is "
        "named: set HOTSWAP_REPLICA_URLS (comma-separated), or turn it off"
    )
    bad = settings_for(fresh, read_from_replicas=True, replica_urls="redis://u:pw@r:6379/0,r2:6379")
    with fresh.client(fresh.primary) as client, pytest.raises(ConfigError) as caught:
        ReplicaReads.of(client, bad)
    assert str(caught.value) == (
        "HOTSWAP_REPLICA_URLS entry 'r2:6379' must start with redis://, rediss:// or unix://"
    )


def agent_process(pair: Pair, model: str) -> contextlib.AbstractContextManager[Any]:
    return launch(
        model,
        {
            "HOTSWAP_REDIS_URL": pair.primary.url,
            "HOTSWAP_READ_FROM_REPLICAS": "true",
            "HOTSWAP_REPLICA_URLS": pair.replica.url,
            "HOTSWAP_POLL_INTERVAL": "0.2",
        },
    )


def test_an_agent_process_applies_bit_exact_through_a_lagging_replica(fresh: Pair) -> None:
    waiting = settings_for(fresh, wait_replicas=1)  # v1: on the replica before it is announced
    with agent_process(fresh, "m") as agent, Publisher("m", settings=waiting) as pub:
        v1 = pub.publish(tensors(1))
        found, counts = applied(agent, v1)
        assert found == fingerprint(tensors(1))
        assert counts["fallbacks"] == 0 and counts["chunks"] > 0
        from_replica = counts["chunks"]

        fresh.lag()
        store = Store.from_settings(pub.client, "m", waiting)
        with Publisher("m", settings=settings_for(fresh)) as quick:  # no WAIT: v2 outruns it
            v2 = quick.publish(tensors(2, CHANGED, base=1))
        new = chunk_names(store, store.manifest(v2), CHANGED)
        with fresh.client(fresh.replica) as r:
            assert r.exists(*new) == 0
        found, counts = applied(agent, v2)
        assert found == fingerprint(tensors(2, CHANGED, base=1))
        # Only the changed tensors were fetched, each chunk from the primary.
        assert (counts["chunks"], counts["fallbacks"]) == (from_replica, len(new))

        # A delta's frames the replica lacks come from the primary too.
        v3_state = tensors(2, CHANGED, base=1)
        v3_state["layer0.weight"][0, 0] += 1
        with Publisher("m", settings=settings_for(fresh, deltas=True)) as quick:
            v3 = quick.publish(v3_state)
            (entry,) = [e for e in quick.store.manifest(v3).tensors if e.name == "layer0.weight"]
        assert entry.delta is not None
        found, later = applied(agent, v3)
        assert found == fingerprint(v3_state)
        assert (later["chunks"], later["fallbacks"]) == (from_replica, len(new) + entry.chunks)


# -- WAIT ---------------------------------------------------------------------------


def test_wait_before_the_commit_refuses_it_while_the_replica_lags(fresh: Pair) -> None:
    s = settings_for(fresh, wait_replicas=1, wait_timeout_ms=300)
    with Publisher("m", settings=s) as pub:
        v1 = pub.publish(tensors(1))
        log_before = pub.store.log()
        waits = fresh.calls(fresh.primary, "wait")
        fresh.lag()
        with pytest.raises(StoreUnavailable) as caught:
            pub.publish(tensors(2, CHANGED, base=1), message="must wait")
        assert str(caught.value) == (
            f"model 'm': not committed, replicas confirmed the blobs within 300 ms only on "
            f"127.0.0.1:{fresh.primary.port}: 0 of 1; nothing changed. Check the replicas "
            "(INFO replication), or lower HOTSWAP_WAIT_REPLICAS or raise "
            "HOTSWAP_WAIT_TIMEOUT_MS, and publish again"
        )
        # One WAIT (the blobs'), and no commit: head, versions and log as they were.
        assert fresh.calls(fresh.primary, "wait") - waits == 1
        assert pub.store.head() == v1 and pub.store.versions() == [v1]
        assert pub.store.log() == log_before
        fresh.catch_up()
        assert pub.publish(tensors(2, CHANGED, base=1), message="must wait") == v1 + 1


def test_a_publish_that_waits_returns_once_the_replica_holds_the_version(fresh: Pair) -> None:
    s = settings_for(fresh, wait_replicas=1)
    with Publisher("m", settings=s) as pub:
        waits = fresh.calls(fresh.primary, "wait")
        v1 = pub.publish(tensors(1))
        assert fresh.calls(fresh.primary, "wait") - waits == 2  # before and after the commit
        outcome = pub.replication.last
        assert outcome is not None and outcome.ok and outcome.what == "commit"
        m = pub.store.manifest(v1)
        names = chunk_names(pub.store, m)
        meta = [keys.head_key("hotswap", "m"), keys.manifest_key("hotswap", "m", v1)]
        with fresh.client(fresh.replica) as r, fresh.client(fresh.primary) as p:
            # No waiting here: WAIT already did, so the replica has it all now.
            assert r.exists(*names) == len(names)
            assert r.mget(meta) == p.mget(meta)


def test_a_shortfall_after_the_commit_is_reported_not_raised(
    fresh: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_for(fresh, wait_replicas=1, wait_timeout_ms=300)
    with Publisher("m", settings=s) as pub:
        before = pub.replication.before_commit

        def then_lag(*args: Any) -> Any:  # the replica holds the blobs, then falls behind
            outcome = before(*args)
            fresh.lag()
            return outcome

        pub.replication.before_commit = then_lag  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, "hotswap.replication"):
            v1 = pub.publish(tensors(1))
        assert pub.store.head() == v1
        outcome = pub.replication.last
        assert outcome is not None and not outcome.ok
        assert outcome.acked == {f"127.0.0.1:{fresh.primary.port}": 0}
    assert caplog.messages == [
        f"model 'm': v{v1} is committed and announced, but replicas confirmed the commit "
        f"within 300 ms only on 127.0.0.1:{fresh.primary.port}: 0 of 1: a failover now could "
        "lose it; check the replicas (INFO replication)"
    ]


def test_a_primary_away_after_the_commit_is_reported_not_raised(
    fresh: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_for(fresh, wait_replicas=1, wait_timeout_ms=300, socket_timeout=1)
    try:
        with Publisher("m", settings=s) as pub:
            commit = pub.store.commit

            def then_freeze(*args: Any, **kwargs: Any) -> None:  # committed, then frozen
                commit(*args, **kwargs)
                fresh.primary.freeze()

            pub.store.commit = then_freeze  # type: ignore[method-assign]
            with caplog.at_level(logging.WARNING, "hotswap.replication"):
                v1 = pub.publish(tensors(1))
            outcome = pub.replication.last
            assert outcome is not None and not outcome.ok and outcome.failed is not None
    finally:
        fresh.primary.thaw()
    with fresh.client(fresh.primary) as p:
        assert p.get(keys.head_key("hotswap", "m")) is not None
    (message,) = caplog.messages
    assert message.startswith(
        f"model 'm': v{v1} is committed and announced, but no replica could be asked about "
        "the commit (Redis unreachable while waiting for replicas (commit) for model 'm'"
    )


def test_a_wait_longer_than_the_socket_timeout_is_refused(fresh: Pair) -> None:
    s = settings_for(fresh, wait_replicas=1, wait_timeout_ms=5000, socket_timeout=5)
    with fresh.client(fresh.primary) as client, pytest.raises(ConfigError) as caught:
        Replication.of(client, "m", s)
    assert str(caught.value) == (
        "HOTSWAP_WAIT_TIMEOUT_MS=5000 must be under HOTSWAP_SOCKET_TIMEOUT (5 s): lower it, "
        "or raise the socket timeout"
    )


def test_the_documented_acl_users_wait_and_read_from_a_replica() -> None:
    from test_readme import acl_password, blocks

    from hotswap import Agent

    (block,) = [b for b in blocks() if b.lang == "acl"]
    with (
        EmbeddedRedis() as primary,
        EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]) as replica,
    ):
        for node in (replica, primary):  # ACL users are not replicated: every node gets them
            with redis.Redis(port=node.port) as c:
                if node is replica:  # and the replica logs in to its primary as one of them
                    c.config_set("masteruser", "hotswap-admin")
                    c.config_set("masterauth", "secret-admin")
                for rule in block.body.strip().splitlines():
                    c.execute_command(*acl_password(rule).split())

        def as_user(node: EmbeddedRedis, role: str, user: str) -> str:
            return f"redis://{user}:secret-{role}@127.0.0.1:{node.port}/0"

        admins = [
            redis.Redis.from_url(as_user(n, "admin", "hotswap-admin")) for n in (primary, replica)
        ]
        assert poll(lambda: admins[1].info("replication")["master_link_status"] == "up", 1500)
        for admin in admins:
            admin.execute_command("ACL", "LOG", "RESET")
        agent_user = "hotswap-agent-web-1"
        agent_settings = HotswapSettings(
            redis_url=as_user(primary, "agent", agent_user),
            agent_id="web-1",
            read_from_replicas=True,
            replica_urls=as_user(replica, "agent", agent_user),
            poll_interval=0.2,
            _env_file=None,  # type: ignore[call-arg]
        )
        publisher_settings = HotswapSettings(
            redis_url=as_user(primary, "publisher", "hotswap-publisher"),
            chunk_bytes=4096,
            wait_replicas=1,
            _env_file=None,  # type: ignore[call-arg]
        )
        state = {k: torch.zeros_like(v) for k, v in tensors(1).items()}
        with Agent(state, "acl", settings=agent_settings) as agent:
            with Publisher("acl", settings=publisher_settings) as pub:
                v1 = pub.publish(tensors(1))
                assert pub.replication.last is not None and pub.replication.last.ok
            assert agent.wait_for(v1)
            counts = agent.store.blobs.replicas.counts if agent.store.blobs.replicas else None
        assert fingerprint(state) == fingerprint(tensors(1))
        assert counts is not None and counts.chunks > 0 and counts.fallbacks == 0
        for admin in admins:
            assert admin.execute_command("ACL", "LOG") == [], "a documented user was refused"
            admin.close()
