"""Notices on a Redis Cluster travel on the model's shard channel (issue 16), 3+3 nodes.

The agent (``notice_worker.py``, a process of its own) listens with SSUBSCRIBE
on the master that owns the model's slot; a commit SPUBLISHes, so only that
shard hears the notice (the cluster bus counters of every node say so).
After a ``CLUSTER FAILOVER`` the agent subscribes again at the new owner and
the next notice still arrives, not the poll (its interval is longer than the
test). After a failover that lost the agent's last status write, the record
is written again as soon as the agent's client learns the new slot map.
Every test ends with docs/reliability.md's check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from cluster_support import Cluster, _client
from ha_process import EventWorker, assert_runs_exactly_one, content_of, state
from test_failover_cluster import MODEL, ROOT, Worker, settings_for
from waiting import poll

from hotswap import keys
from hotswap.store import Store
from hotswap.subscription import BROADCAST
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

WORKER = ROOT / "tests" / "ha" / "notice_worker.py"
# Longer than any test here: an update that arrives came by notice (or by the
# look at head that follows a new subscription, which the tests wait out first).
LONG_POLL = 120.0
POLL = 0.5


@pytest.fixture(scope="module")
def topology() -> Iterator[Cluster]:
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(topology: Cluster) -> Cluster:
    """The module's cluster, whole (the last test's failover healed) and empty."""
    topology.restore()
    topology.flush()
    return topology


class NoticeWorker(Worker):
    """``notice_worker.py``: ``ha_worker.py`` that also reports subscriptions and notices."""

    def __init__(
        self, url: str, poll_interval: float, heartbeat_ttl: float = 15.0, plain: bool = False
    ) -> None:
        EventWorker.__init__(
            self,
            WORKER,
            *(url, MODEL, "--poll", str(poll_interval), "--heartbeat-ttl", str(heartbeat_ttl)),
            *("--socket-timeout", "2.0", *(["--plain"] if plain else [])),
        )

    def events(self, kind: str, since: int = 0) -> list[list[str]]:
        """The events of ``kind`` among those after the first ``since``."""
        return [e for e in self.seen[since:] if e[0] == kind]

    def wait_since(self, since: int, match: Callable[[list[str]], bool]) -> list[str]:
        """The first event after the first ``since`` that ``match`` accepts."""
        earlier = self.seen[:since]
        return self.wait(lambda e: match(e) and not any(x is e for x in earlier))


def name_of(node: object) -> str:
    return f"127.0.0.1:{node.port}"  # type: ignore[attr-defined]


def bus_counters(cluster: Cluster) -> dict[int, dict[str, int]]:
    """Each node's cluster-bus pub/sub counters (``CLUSTER INFO``), by port."""
    out: dict[int, dict[str, int]] = {}
    for node in cluster.alive():
        with _client(node) as c:
            info = c.execute_command("CLUSTER", "INFO").decode()
        pairs = (line.split(":", 1) for line in info.split() if "publish" in line)
        out[node.port] = {k: int(v) for k, v in pairs}
    return out


def grew(
    before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]
) -> dict[int, set[str]]:
    """Which counters grew, by port (ports where none did left out)."""
    changes = {
        port: {k for k, v in counts.items() if v > before.get(port, {}).get(k, 0)}
        for port, counts in after.items()
    }
    return {port: names for port, names in changes.items() if names}


def test_a_notice_reaches_the_agent_through_its_shard_only(cluster: Cluster) -> None:
    seeds = cluster.urls()
    pub = Publisher(MODEL, settings=settings_for(seeds))
    worker: NoticeWorker | None = None
    listeners: list[redis.client.PubSub] = []
    try:
        assert pub.publish(state(1)) == 1
        store = pub.store
        channel = keys.events_channel(store.ns, MODEL)
        owner = cluster.owner_of(channel)
        replica = cluster.replica_of(owner)
        worker = NoticeWorker(seeds, LONG_POLL)
        worker.applied(1)
        worker.wait(lambda e: e[:2] == ["SUBSCRIBED", name_of(owner)])
        # A plain listener on every other node: a broadcast (PUBLISH) would reach each.
        for node in cluster.alive():
            if node is not owner:
                listener = redis.Redis(port=node.port).pubsub(ignore_subscribe_messages=True)
                listener.subscribe(channel)
                listeners.append(listener)
        for node in cluster.alive():
            with _client(node) as c:
                shard_subs = c.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]
            assert shard_subs == (1 if node is owner else 0), node.port
        before = bus_counters(cluster)

        assert pub.publish(state(2)) == 2
        fetched = float(worker.wait(lambda e: e[:2] == ["FETCHED", "2"])[2])
        worker.applied(2)
        notices = worker.events("NOTICE")
        assert [e[1] for e in notices] == [name_of(owner)], notices
        assert float(notices[0][2]) <= fetched
        # The owner's replica gets the message over the cluster bus (a shard
        # propagates to its replicas); wait for it, then nobody else got anything.
        assert poll(
            lambda: (
                "cluster_stats_messages_publishshard_received"
                in grew(before, bus_counters(cluster)).get(replica.port, set())
            )
        )
        changed = grew(before, bus_counters(cluster))
        assert changed == {
            owner.port: {"cluster_stats_messages_publishshard_sent"},
            replica.port: {"cluster_stats_messages_publishshard_received"},
        }, changed
        assert [listener.get_message(timeout=0.0) for listener in listeners] == [None] * len(
            listeners
        )
        print(f"notice to fetch start {1000 * (fetched - float(notices[0][2])):.2f} ms")
        result = worker.finish()
        assert result["mixed_count"] == 0, result["mixed"]
        digests = result["digests"]
        assert isinstance(digests, dict)
        assert_runs_exactly_one(store, digests, 2)
    finally:
        for listener in listeners:
            listener.close()
        if worker is not None:
            worker.kill()
        pub.close()


def test_the_agent_follows_its_shard_channel_through_a_cluster_failover(
    cluster: Cluster,
) -> None:
    seeds = cluster.urls()
    pub = Publisher(MODEL, settings=settings_for(seeds))
    worker: NoticeWorker | None = None
    try:
        assert pub.publish(state(1)) == 1
        store = pub.store
        channel = keys.events_channel(store.ns, MODEL)
        owner = cluster.owner_of(channel)
        heir = cluster.replica_of(owner)
        worker = NoticeWorker(seeds, LONG_POLL)
        worker.applied(1)
        worker.wait(lambda e: e[:2] == ["SUBSCRIBED", name_of(owner)])
        mark = len(worker.seen)

        cluster.failover_to(heir)
        assert cluster.poll_until_served_by(channel, heir), "the replica never took over"
        # The old owner dropped the shard channel; the agent subscribed at the heir.
        worker.wait_since(mark, lambda e: e[:2] == ["SUBSCRIBED", name_of(heir)])
        mark = len(worker.seen)

        assert pub.publish(state(2)) == 2
        fetched = float(worker.wait(lambda e: e[:2] == ["FETCHED", "2"])[2])
        worker.applied(2)
        heard = worker.events("NOTICE", since=mark)
        assert [e[1] for e in heard] == [name_of(heir)], worker.seen[mark:]
        assert float(heard[0][2]) <= fetched
        with _client(heir) as c:
            assert c.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1
        with _client(owner) as c:
            assert c.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0
        subscriptions = [e[1] for e in worker.events("SUBSCRIBED")]
        print(
            f"after CLUSTER FAILOVER: notice to fetch start "
            f"{1000 * (fetched - float(heard[0][2])):.2f} ms; subscriptions {subscriptions}"
        )
        result = worker.finish()
        assert result["mixed_count"] == 0, result["mixed"]
        digests = result["digests"]
        assert isinstance(digests, dict)
        assert_runs_exactly_one(store, digests, 2)
        assert content_of(store, 2) != content_of(store, 1)
    finally:
        if worker is not None:
            worker.kill()
        pub.close()


def test_status_is_written_again_after_a_failover_lost_the_last_write(
    cluster: Cluster,
) -> None:
    """The replica misses the agent's record (frozen while the agent starts), its
    master dies, the replica takes over: the agent's record is back as soon as its
    client learns the new slot map, not at its next heartbeat (a third of the TTL)."""
    seeds = cluster.urls()
    pub = Publisher(MODEL, settings=settings_for(seeds))
    worker: NoticeWorker | None = None
    try:
        assert pub.publish(state(1)) == 1
        store = pub.store
        head = keys.head_key(store.ns, MODEL)
        victim = cluster.owner_of(head)
        heir = cluster.replica_of(victim)
        with _client(victim) as c:
            assert c.execute_command("WAIT", 1, 10_000) == 1  # v1 is on the heir
            # A frozen replica still receives what its socket buffers hold; one the
            # master has given up on receives nothing more.
            c.config_set("repl-timeout", 1)
            cluster.freeze(heir)
            assert poll(lambda: c.info("replication")["connected_slaves"] == 0, attempts=500)
        # A heartbeat TTL whose third is far beyond what the test waits for; seeds
        # without the frozen node, which would hold the agent's first command.
        others = cluster.urls([n for n in cluster.nodes if n is not heir])
        worker = NoticeWorker(others, POLL, heartbeat_ttl=600.0)
        worker.applied(1)
        record = keys.agent_status_key(store.ns, MODEL, worker.agent_id)
        with _client(victim) as c:
            assert poll(lambda: c.exists(record) == 1)

        victim.kill()
        heir.thaw()
        cluster.frozen.discard(heir.port)
        with _client(heir) as c:
            c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        assert cluster.poll_until_served_by(head, heir), "the replica never took over"
        # The heir never had the record: it comes back with the agent's next write.
        reader = Store(redis.cluster.RedisCluster.from_url(heir.url), MODEL)
        rows: list[int] = []

        def agent_is_listed() -> bool:
            rows.append(1)
            return any(
                r.agent_id == worker.agent_id and r.alive for r in reader.agent_report().records
            )

        # Polled every tenth of a second, for at most a few poll intervals (the
        # heartbeat would rewrite it only after 200 s).
        assert poll(agent_is_listed, attempts=int(4 * POLL / 0.1) + 10, pause=0.1), (
            f"the agent's record did not come back within {len(rows)} reads"
        )
        print(f"record back after {len(rows)} reads 0.1 s apart")
        reader.client.close()
        result = worker.finish()
        assert result["mixed_count"] == 0, result["mixed"]
        digests = result["digests"]
        assert isinstance(digests, dict)
        assert_runs_exactly_one(store, digests, 1)
    finally:
        if worker is not None:
            worker.kill()
        pub.close()


def finish_on(worker: NoticeWorker, store: Store, version: int) -> None:
    """End ``worker`` and check docs/reliability.md's invariant on what it serves."""
    result = worker.finish()
    assert result["mixed_count"] == 0, result["mixed"]
    digests = result["digests"]
    assert isinstance(digests, dict)
    assert_runs_exactly_one(store, digests, version)


def test_a_rolling_upgrade_loses_no_version(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent from before shard channels (plain SUBSCRIBE) applies a new publisher's
    versions by its poll; an agent of this version hears an old publisher's broadcast."""
    seeds = cluster.urls()
    pub = Publisher(MODEL, settings=settings_for(seeds))
    workers: list[NoticeWorker] = []
    try:
        assert pub.publish(state(1)) == 1
        store = pub.store
        owner = cluster.owner_of(keys.events_channel(store.ns, MODEL))
        new = NoticeWorker(seeds, LONG_POLL)
        workers.append(new)
        old = NoticeWorker(seeds, POLL, plain=True)
        workers.append(old)
        for worker, node in ((new, name_of(owner)), (old, "plain")):
            worker.applied(1)
            worker.wait(lambda e, node=node: e[:2] == ["SUBSCRIBED", node])

        assert pub.publish(state(2)) == 2  # SPUBLISH: the old agent's poll finds it
        new.applied(2)
        old.applied(2)
        assert [e[1] for e in new.events("NOTICE")] == [name_of(owner)]
        assert old.events("NOTICE") == []

        # A publisher from before: PUBLISH, which every node passes on.
        monkeypatch.setattr("hotswap.store.notice_mode", lambda client: BROADCAST)
        assert pub.publish(state(3)) == 3
        new.applied(3)
        old.applied(3)
        assert [e[1] for e in new.events("NOTICE")] == [name_of(owner)] * 2
        old.wait(lambda e: e[:2] == ["NOTICE", "plain"])
        for worker in workers:
            finish_on(worker, store, 3)
    finally:
        for worker in workers:
            worker.kill()
        pub.close()


def test_users_without_shard_channel_rights_fall_back_to_plain_pub_sub(cluster: Cluster) -> None:
    """As on Redis < 7 (where the commands are unknown): the agent listens on the plain
    channel, the commit script's SPUBLISH is refused and it PUBLISHes instead."""
    for node in cluster.alive():
        with _client(node) as c:
            c.execute_command(
                "ACL", "SETUSER", "pre7", "reset", "on", ">pw", "~*", "&*", "+@all",
                "-ssubscribe", "-spublish",
            )  # fmt: skip
            c.execute_command("ACL", "LOG", "RESET")
    seeds = ",".join(f"redis://pre7:pw@127.0.0.1:{n.port}" for n in cluster.nodes)
    pub = Publisher(MODEL, settings=settings_for(seeds))
    worker: NoticeWorker | None = None
    try:
        assert pub.publish(state(1)) == 1
        store = pub.store
        owner = cluster.owner_of(keys.events_channel(store.ns, MODEL))
        worker = NoticeWorker(seeds, LONG_POLL)
        worker.applied(1)
        worker.wait(lambda e: e[:2] == ["SUBSCRIBED", "plain"])
        assert pub.publish(state(2)) == 2
        worker.applied(2)
        assert [e[1] for e in worker.events("NOTICE")] == ["plain"]
        with _client(owner) as c:
            refused = {e[b"object"].decode() for e in c.execute_command("ACL", "LOG")}
        # Each refusal is in Redis's ACL LOG, where an operator looks for them.
        assert {"ssubscribe", "spublish"} <= refused, refused
        finish_on(worker, store, 2)
    finally:
        if worker is not None:
            worker.kill()
        pub.close()
        for node in cluster.alive():
            with _client(node) as c:
                c.execute_command("ACL", "DELUSER", "pre7")
