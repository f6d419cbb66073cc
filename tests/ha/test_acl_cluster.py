"""The documented ACL users (README "Security", docs/reliability.md) on a real Redis Cluster.

Issue 16: one 3-master, 3-replica cluster for the module, the README's ``ACL
SETUSER`` lines run verbatim and in order on every node (the block is parsed
from the README, as ``tests/test_readme.py`` does, and must equal
docs/reliability.md's). Under those users: a publish that WAITs for a
replica, an agent in a process of its own (``tests/replica_worker.py``)
reading blob chunks from the replicas and hearing versions on the model's
shard channel (its poll interval is longer than the test), a delta version,
and ``hotswap rollback``/``status``/``gc``/``verify`` as the publisher user.
Redis's ``ACL LOG`` must stay empty on every node: a command the code needs
but the users lack shows there even where the code swallows the refusal.
Then each user is refused the rest on every node, and nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from cluster_support import Cluster, _client
from redis.backoff import NoBackoff
from redis.retry import Retry
from replica_worker import applied, fingerprint, launch, tensors
from test_readme import acl_password, blocks, reliability_acl_lines
from waiting import poll

from hotswap import keys
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError
from hotswap.settings import HotswapSettings
from publisher import Publisher, cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

MODEL = "acl-cluster"
ADMIN = "hotswap-admin"
PUBLISHER = "hotswap-publisher"
# Longer than the module: a version the agent applies came by notice.
LONG_POLL = "600"


def documented() -> list[str]:
    """The README's ACL block, line for line docs/reliability.md's, passwords set."""
    (block,) = [b for b in blocks() if b.lang == "acl"]
    lines = block.body.strip().splitlines()
    assert lines == reliability_acl_lines()
    return [acl_password(line) for line in lines]


def password(user: str) -> str:
    (line,) = [line for line in documented() if line.split()[2] == user]
    return next(word[1:] for word in line.split() if word.startswith(">"))


def agent_user() -> str:
    (user,) = [w[2] for w in map(str.split, documented()) if w[2].startswith("hotswap-agent-")]
    return user


AGENT = agent_user()
AGENT_ID = AGENT.removeprefix("hotswap-agent-")


def as_user(node: EmbeddedRedis, user: str) -> redis.Redis:
    return redis.Redis(port=node.port, username=user, password=password(user), socket_timeout=5)


def seeds(cluster: Cluster, user: str) -> str:
    """``HOTSWAP_REDIS_URL`` for ``user``: every node, the first URL's credentials for all."""
    first, *rest = cluster.nodes
    return ",".join(
        [f"redis://{user}:{password(user)}@127.0.0.1:{first.port}"]
        + [f"127.0.0.1:{n.port}" for n in rest]
    )


def replication_up(cluster: Cluster) -> bool:
    """Every replica's link is up (re-opened as the admin user) and every node's
    CLUSTER SLOTS names a replica for each range (a client learning the map sees them)."""
    for node in cluster.nodes:
        with as_user(node, ADMIN) as c:
            info = c.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
            if info["role"] == "master" and info.get("connected_slaves") != 1:
                return False
            if any(len(entry) < 4 for entry in c.execute_command("CLUSTER", "SLOTS")):
                return False
    return True


@pytest.fixture(scope="module")
def topology() -> Iterator[Cluster]:
    with Cluster() as cluster:
        for node in cluster.nodes:
            with _client(node) as c:
                # Replication once `default` is off (README: "give a replica a
                # masteruser/masterauth that may replicate"): the admin user may.
                c.config_set("masteruser", ADMIN)
                c.config_set("masterauth", password(ADMIN))
                for line in documented():  # verbatim, in order, as `default`
                    assert c.execute_command(*line.split()) in (b"OK", "OK", True)
        # The replicas' links were opened as `default`, which the last line
        # closed (their REPLCONF ACKs are refused): they reconnect as the admin.
        for node in cluster.nodes:
            with as_user(node, ADMIN) as c:
                c.execute_command("CLIENT", "KILL", "TYPE", "replica")
        assert poll(lambda: replication_up(cluster), attempts=1500), "replicas did not reconnect"
        yield cluster


@pytest.fixture
def cluster(topology: Cluster) -> Cluster:
    """The module's cluster, empty, every node's ACL LOG reset."""
    for node in topology.nodes:
        with as_user(node, ADMIN) as c:
            if c.info("replication")["role"] == "master":
                c.flushall()
    for node in topology.nodes:
        with as_user(node, ADMIN) as c:
            c.execute_command("ACL", "LOG", "RESET")
    return topology


def acl_log(cluster: Cluster) -> list[tuple[int, str, str]]:
    """Every node's ACL LOG: (port, user, what was refused)."""
    out = []
    for node in cluster.nodes:
        with as_user(node, ADMIN) as c:
            for e in c.execute_command("ACL", "LOG", 1000):  # all it keeps, not the last 10
                out.append((node.port, e[b"username"].decode(), e[b"object"].decode()))
    return out


def settings_for(cluster: Cluster, user: str, **values: Any) -> HotswapSettings:
    return HotswapSettings(
        redis_url=seeds(cluster, user),
        cluster=True,
        chunk_bytes=4096,
        retry_attempts=1,
        socket_timeout=3.0,
        _env_file=None,  # type: ignore[call-arg]
        **values,
    )


def nudged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a few elements of one tensor changed: a sparse delta."""
    out = {k: v.clone() for k, v in state.items()}
    out["layer1.weight"][0, :5] += 1.0
    return out


def shard_subscribers(cluster: Cluster, channel: str) -> dict[int, int]:
    out = {}
    for node in cluster.nodes:
        with as_user(node, ADMIN) as c:
            out[node.port] = int(c.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])
    return out


def test_the_documented_users_run_the_whole_workflow_on_a_cluster(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = settings_for(cluster, PUBLISHER, wait_replicas=1, deltas=True)
    env = {
        "HOTSWAP_REDIS_URL": seeds(cluster, AGENT),
        "HOTSWAP_CLUSTER": "true",
        "HOTSWAP_READ_FROM_REPLICAS": "true",
        "HOTSWAP_AGENT_ID": AGENT_ID,
        "HOTSWAP_POLL_INTERVAL": LONG_POLL,
        "HOTSWAP_SOCKET_TIMEOUT": "3",
    }
    v1_state = tensors(1)
    v2_state = nudged(v1_state)
    with Publisher(MODEL, settings=publisher) as pub, launch(MODEL, env) as proc:
        channel = keys.events_channel(pub.store.ns, MODEL)
        v1 = pub.publish(v1_state)
        found, counts = applied(proc, v1)  # its look at head, or the notice
        assert found == fingerprint(v1_state)
        # Listening on the model's shard channel, at the one master that owns it.
        assert poll(lambda: sorted(shard_subscribers(cluster, channel).values()) == [0] * 5 + [1])

        v2 = pub.publish(v2_state)
        assert any(e.delta is not None for e in pub.store.manifest(v2).tensors)
        found, after = applied(proc, v2)  # by notice: the poll is minutes away
        assert found == fingerprint(v2_state)
        # WAIT put every chunk on a replica first: each came from there.
        assert after["chunks"] > counts["chunks"] > 0, after
        assert (after["fallbacks"], after["failures"]) == (0, 0), after

        monkeypatch.setenv("HOTSWAP_CLUSTER", "true")
        monkeypatch.setenv("HOTSWAP_WAIT_REPLICAS", "1")
        monkeypatch.setenv("HOTSWAP_RETRY_ATTEMPTS", "1")
        url = ["--redis-url", publisher.redis_url]
        assert cli.main([*url, "rollback", MODEL, "--to", str(v1), "--no-wait"]) == 0
        v3 = pub.store.head()
        assert v3 == v2 + 1
        found, _ = applied(proc, v3)
        assert found == fingerprint(v1_state)
        capsys.readouterr()
        assert cli.main([*url, "status", MODEL]) == 0
        status = capsys.readouterr().out
        assert AGENT_ID in status, status
        assert cli.main([*url, "gc", MODEL, "--keep", "1", "--grace", "0"]) == 0
        assert pub.store.versions() == [v3]
        assert cli.main([*url, "verify", MODEL]) == 0
    assert acl_log(cluster) == [], "the workflow needed a command the documented users lack"


def topology_of(cluster: Cluster) -> set[tuple[str, ...]]:
    """Each node's id, role, master and slots, as the first node sees them."""
    with as_user(cluster.nodes[0], ADMIN) as c:
        lines = c.execute_command("CLUSTER", "NODES").decode().splitlines()
    return {(f[0], f[1].replace("myself,", ""), f[3], *f[8:]) for f in map(str.split, lines)}


def contents(cluster: Cluster) -> dict[object, object]:
    """Every key of every master, with its DUMP, and every node's users."""
    out: dict[object, object] = {}
    for node in cluster.nodes:
        with as_user(node, ADMIN) as c:
            out[node.port] = sorted(c.execute_command("ACL", "LIST"))
            if c.info("replication")["role"] == "master":
                out.update({k: c.dump(k) for k in c.scan_iter(count=1000)})
    return out


def test_each_documented_user_is_refused_the_rest_on_every_node(cluster: Cluster) -> None:
    with Publisher(MODEL, settings=settings_for(cluster, PUBLISHER)) as pub:
        v1 = pub.publish(tensors(1))
        m = pub.store.manifest(v1)
        ns = pub.store.ns
    head = keys.head_key(ns, MODEL)
    channel = keys.events_channel(ns, MODEL)
    chunk = keys.chunk_keys(ns, MODEL, m.tensors[0].digest, m.tensors[0].chunk_bytes, 1)[0]
    before = (contents(cluster), topology_of(cluster))
    some_id = topology_of(cluster).pop()[0]
    # Both users: nothing that changes the cluster, its data wholesale, or the users.
    admin_only: list[tuple[str, ...]] = [
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("ACL", "SETUSER", "default", "on", "nopass", "+@all"),
        ("CLUSTER", "FAILOVER"),
        ("CLUSTER", "RESET"),
        ("CLUSTER", "FORGET", some_id),
        ("CLUSTER", "SETSLOT", "0", "NODE", some_id),
        ("CLUSTER", "REPLICATE", some_id),
        ("CLUSTER", "MEET", "127.0.0.1", "1"),
        ("SHUTDOWN", "NOSAVE"),
        ("GET", "elsewhere"),
        ("SPUBLISH", "elsewhere", "x"),
    ]
    refused: dict[str, list[tuple[str, ...]]] = {
        AGENT: [
            *admin_only,
            ("SET", head, "99"),
            ("SET", chunk, "x"),
            ("DEL", head),
            ("SPUBLISH", channel, "x"),
            ("PUBLISH", channel, "x"),
            ("SET", keys.agent_status_key(ns, MODEL, "web-2"), "x"),
            ("EVALSHA", "0" * 40, "1", head),
            ("SCAN", "0"),
        ],
        PUBLISHER: [
            *admin_only,
            ("HSET", f"hotswap:{{{MODEL}}}:agents", "forged", "x"),
            ("SET", keys.agent_status_key(ns, MODEL, "forged"), "x"),
            ("SSUBSCRIBE", channel),
            ("EVAL", "return 1", "0"),
            ("SCRIPT", "FLUSH"),
        ],
    }
    for node in cluster.nodes:
        for user, commands in refused.items():
            with as_user(node, user) as c:
                for command in commands:
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        c.execute_command(*command)
        # `default` is off (no retries: redis-py retries an AuthenticationError).
        with (
            pytest.raises(redis.AuthenticationError),
            redis.Redis(port=node.port, retry=Retry(NoBackoff(), 0)) as stranger,
        ):
            stranger.ping()
    assert (contents(cluster), topology_of(cluster)) == before
    # Each refusal is in the ACL LOG of the node that refused it.
    logged = {(port, user, what) for port, user, what in acl_log(cluster)}
    assert {(p, u) for p, u, _ in logged} == {
        (n.port, u) for n in cluster.nodes for u in (AGENT, PUBLISHER)
    }
    # Through the library: a one-line ConfigError, head unchanged.
    with (
        pytest.raises(ConfigError, match=r"^Redis user may not do this while "),
        Publisher(MODEL, settings=settings_for(cluster, AGENT)) as forged,
    ):
        forged.publish(tensors(2))
    with Publisher(MODEL, settings=settings_for(cluster, PUBLISHER)) as pub:
        assert pub.store.head() == v1 and pub.store.versions() == [v1]


@pytest.mark.parametrize("grant", ["+cluster|slots", "+command"])
def test_a_user_without_a_cluster_grant_is_told_which_and_nothing_changes(
    cluster: Cluster, grant: str
) -> None:
    """redis-py calls a refused CLUSTER SLOTS "Cluster mode is not enabled": the
    error must not send the user off to unset HOTSWAP_CLUSTER."""
    line = next(line for line in documented() if line.split()[2] == PUBLISHER)
    words = [w for w in line.split() if w != grant]
    words[2] = "hotswap-publisher-old"
    for node in cluster.nodes:
        with as_user(node, ADMIN) as c:
            c.execute_command(*words)
    try:
        with Publisher(MODEL, settings=settings_for(cluster, PUBLISHER)) as pub:
            v1 = pub.publish(tensors(1))
        old = settings_for(cluster, PUBLISHER)
        old.redis_url = old.redis_url.replace(f"{PUBLISHER}:", "hotswap-publisher-old:", 1)
        with pytest.raises(ConfigError) as e, Publisher(MODEL, settings=old) as stale:
            stale.publish(tensors(2))
        shown = old.redis_url.replace(password(PUBLISHER), "***", 1)
        message = str(e.value)
        assert message.startswith(
            f"Redis user may not do this while connecting to the Redis Cluster at {shown}: "
        ), message
        # Redis 7.0 says "this user", later versions the user's name.
        assert message.endswith(
            f" has no permissions to run the '{grant[1:]}' command; "
            "its user needs +cluster|slots +command (README, Security)"
        ), message
        with Publisher(MODEL, settings=settings_for(cluster, PUBLISHER)) as pub:
            assert pub.store.head() == v1 and pub.store.versions() == [v1]
    finally:
        for node in cluster.nodes:
            with as_user(node, ADMIN) as c:
                c.execute_command("ACL", "DELUSER", words[2])
