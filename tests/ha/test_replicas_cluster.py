"""Blob chunks from the replicas of a real Redis Cluster, and WAIT on every master (issue 16).

One 3-master, 3-replica topology for the module. The agent is
``tests/replica_worker.py`` in a process of its own, reading with
``HOTSWAP_READ_FROM_REPLICAS``; what the replicas served is read from their
own ``INFO``. A replica is made to lag with ``CLIENT PAUSE WRITE`` (it serves
reads, applies and acknowledges no write). Every check of the model is
bit-exact against the published tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from cluster_support import Cluster
from replica_worker import applied, fingerprint, launch, tensors
from waiting import poll

from hotswap import codec, keys
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import StoreUnavailable
from hotswap.manifest import Manifest
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

MODEL = "rr"
CHANGED = {"layer1.weight", "layer4.weight"}


@pytest.fixture(scope="module")
def topology() -> Iterator[Cluster]:
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(topology: Cluster) -> Iterator[Cluster]:
    """The module's cluster, whole, empty, every replica caught up, statistics zeroed."""
    topology.restore()
    topology.flush()
    assert poll(lambda: every_node_lists_the_replicas(topology), 1500)
    for node in topology.alive():
        with _client(node) as c:
            c.execute_command("CONFIG", "RESETSTAT")
    yield topology
    for node in topology.alive():
        with _client(node) as c:
            c.execute_command("CLIENT", "UNPAUSE")


def every_node_lists_the_replicas(cluster: Cluster) -> bool:
    """Whether each node's CLUSTER SLOTS names a replica for every range (gossip has
    spread the replicas): a client learning the map then sees them."""
    for node in cluster.alive():
        with _client(node) as c:
            if any(len(entry) < 4 for entry in c.execute_command("CLUSTER", "SLOTS")):
                return False
    return True


def _client(node: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=5)


def stat(node: EmbeddedRedis, section: str, field: str) -> int:
    with _client(node) as c:
        info: dict[str, Any] = c.info(section)
    if section == "commandstats":
        return int(info.get(f"cmdstat_{field}", {}).get("calls", 0))
    return int(info[field])


def settings_for(cluster: Cluster, **values: Any) -> HotswapSettings:
    return HotswapSettings(
        redis_url=cluster.urls(),
        cluster=True,
        chunk_bytes=4096,
        deltas=False,
        socket_timeout=3.0,
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


def agent(cluster: Cluster) -> Any:
    return launch(
        MODEL,
        {
            "HOTSWAP_REDIS_URL": cluster.urls(),
            "HOTSWAP_CLUSTER": "true",
            "HOTSWAP_READ_FROM_REPLICAS": "true",
            "HOTSWAP_POLL_INTERVAL": "0.2",
            "HOTSWAP_SOCKET_TIMEOUT": "3",
        },
    )


def test_agents_read_blobs_from_the_replicas_after_a_publish_that_waits(cluster: Cluster) -> None:
    masters = cluster.masters
    replicas = [cluster.replica_of(m) for m in masters]
    with (
        agent(cluster) as proc,
        Publisher(MODEL, settings=settings_for(cluster, wait_replicas=1)) as pub,
    ):
        v1 = pub.publish(tensors(1))
        m = pub.store.manifest(v1)
        names = chunk_names(pub.store, m)
        # The blobs went to all three masters; each was asked to WAIT before the
        # commit, and the metadata's master again after it.
        meta = cluster.owner_of(keys.head_key("hotswap", MODEL))
        waits = {n.port: stat(n, "commandstats", "wait") for n in masters}
        assert waits == {n.port: 2 if n is meta else 1 for n in masters}
        found, counts = applied(proc, v1)
    assert found == fingerprint(tensors(1))
    # WAIT put every chunk on the replicas before the agent heard of v1: all came from there.
    assert (counts["chunks"], counts["fallbacks"], counts["failures"]) == (len(names), 0, 0)
    served = [stat(r, "commandstats", "get") for r in replicas]
    assert sum(served) == len(names) and all(served), served
    sent = sum(stat(r, "stats", "total_net_output_bytes") for r in replicas)
    assert sent >= m.nbytes


def test_a_lagging_cluster_replica_falls_back_to_its_master_bit_exact(cluster: Cluster) -> None:
    changed = tensors(2, CHANGED, base=1)["layer1.weight"]
    digest = codec.digest(codec.as_bytes(changed))
    master = cluster.owner_of(keys.blob_key("hotswap", MODEL, digest, 4096, 0))
    behind = cluster.replica_of(master)
    with (
        agent(cluster) as proc,
        Publisher(MODEL, settings=settings_for(cluster, wait_replicas=1)) as pub,
    ):
        v1 = pub.publish(tensors(1))
        found, counts = applied(proc, v1)
        assert found == fingerprint(tensors(1)) and counts["fallbacks"] == 0
        with _client(behind) as c:
            c.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
        with Publisher(MODEL, settings=settings_for(cluster)) as quick:  # no WAIT
            v2 = quick.publish(tensors(2, CHANGED, base=1))
        new = chunk_names(pub.store, pub.store.manifest(v2), CHANGED)
        lacking = [k for k in new if cluster.owner_of(k) is master]
        assert lacking and len(lacking) < len(new)
        found, after = applied(proc, v2)
    assert found == fingerprint(tensors(2, CHANGED, base=1))
    assert after["fallbacks"] == len(lacking)
    assert after["chunks"] - counts["chunks"] == len(new) - len(lacking)


def test_wait_refuses_a_commit_while_one_masters_replica_lags(cluster: Cluster) -> None:
    behind = cluster.replica_of(cluster.masters[1])
    s = settings_for(cluster, wait_replicas=1, wait_timeout_ms=300)
    with Publisher(MODEL, settings=s) as pub:
        v1 = pub.publish(tensors(1))
        with _client(behind) as c:
            c.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
        with pytest.raises(StoreUnavailable) as caught:
            pub.publish(tensors(2, CHANGED, base=1))
        assert f"{cluster.masters[1].port}: 0 of 1; nothing changed" in str(caught.value)
        assert pub.store.head() == v1 and pub.store.versions() == [v1]
        with _client(behind) as c:
            c.execute_command("CLIENT", "UNPAUSE")
        assert pub.publish(tensors(2, CHANGED, base=1)) == v1 + 1


def test_a_dead_cluster_replica_costs_fallbacks_not_a_version(cluster: Cluster) -> None:
    dead = cluster.replica_of(cluster.masters[2])
    with agent(cluster) as proc, Publisher(MODEL, settings=settings_for(cluster)) as pub:
        v1 = pub.publish(tensors(1))
        found, counts = applied(proc, v1)
        assert found == fingerprint(tensors(1))
        dead.kill()
        v2 = pub.publish(tensors(2, CHANGED, base=1))
        new = chunk_names(pub.store, pub.store.manifest(v2), CHANGED)
        found, after = applied(proc, v2)
    assert found == fingerprint(tensors(2, CHANGED, base=1))
    # The read that met the dead replica failed as a whole and went to the masters.
    assert after["failures"] == counts["failures"] + 1
    assert after["fallbacks"] - counts["fallbacks"] == len(new)
    assert after["chunks"] == counts["chunks"]
