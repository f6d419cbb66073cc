"""A fleet rides through a Redis Cluster failover (issue 16), on 3 masters and 3 replicas.

One topology for the module (``cluster``); each test leaves it whole again.
The serving process is ``ha_worker.py``, a process of its own; the publisher
and the CLI name several seed nodes. Every test ends with the check of
docs/reliability.md: the live model bit-equal to exactly one published
version, never a mix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_support import Cluster
from ha_process import (
    EventWorker,
    HeartbeatWatch,
    assert_runs_exactly_one,
    content_of,
    publish,
    state,
)
from serving_worker import Probe
from waiting import poll

from hotswap import codec, keys
from hotswap.agent import Agent
from hotswap.connection import connect
from hotswap.errors import StoreUnavailable
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

MODEL = "ha"
POLL = 0.5
WORKER = Path(__file__).with_name("ha_worker.py")
ROOT = Path(__file__).resolve().parents[2]


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


def settings_for(url: str) -> HotswapSettings:
    return HotswapSettings(
        redis_url=url,
        cluster=True,
        chunk_bytes=64 * 1024,
        poll_interval=POLL,
        retry_attempts=4,
        retry_max_wait=0.5,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
    )


def hotswap_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")},
        "HOTSWAP_REDIS_URL": url,
        "HOTSWAP_CLUSTER": "true",
        "HOTSWAP_RETRY_ATTEMPTS": "3",
        "HOTSWAP_CONNECT_TIMEOUT": "1",
        # Below the node timeout, as docs advise: a frozen seed costs this much.
        "HOTSWAP_SOCKET_TIMEOUT": "2",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


class Worker(EventWorker):
    """``ha_worker.py`` in its own process; its event lines land in ``seen``."""

    def __init__(self, url: str, heartbeat_ttl: float, socket_timeout: float) -> None:
        super().__init__(
            WORKER,
            *(url, MODEL, "--poll", str(POLL), "--heartbeat-ttl", str(heartbeat_ttl)),
            *("--socket-timeout", str(socket_timeout)),
        )


def test_several_seed_nodes_survive_losing_the_first(cluster: Cluster) -> None:
    """Issue 16, defect 2: with the first seed dead, new clients (publisher, CLI, an
    agent starting) connect through the others."""
    first = cluster.replica_of(cluster.masters[0])  # a replica: no failover to wait for
    others = [n for n in cluster.nodes if n is not first]
    seeds = cluster.urls([first, *others[:2]])
    with Publisher(MODEL, settings=settings_for(seeds)) as pub:
        assert pub.publish(state(1)) == 1
    first.kill()
    # One seed, dead: what every new client met before (the cluster is healthy).
    with pytest.raises(StoreUnavailable) as e:
        connect(settings_for(first.url))
    assert str(e.value).startswith(f"Redis Cluster at {first.url} unreachable (")
    # The same list as before, first seed dead: a new publisher and the CLI work.
    with Publisher(MODEL, settings=settings_for(seeds)) as pub:
        assert pub.publish(state(2)) == 2
        assert pub.store.head() == 2
    host_port = ",".join(f"127.0.0.1:{n.port}" for n in others[:2])
    done = hotswap_cli(f"{first.url},{host_port}", "status", MODEL, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["head"] == 2
    verified = hotswap_cli(seeds, "verify", MODEL)
    assert verified.returncode == 0, verified.stderr
    # An agent starting now (a restarted serving process) connects and applies head.
    served = Probe()
    with Agent(served, MODEL, settings=settings_for(seeds)) as agent:
        assert agent.wait_for(2, 30)
        assert {k: codec.digest(codec.as_bytes(t)) for k, t in served.state_dict().items()} == (
            content_of(Store(agent.store.client, MODEL), 2)
        )


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("kill-9", id="kill-9"),
        # A frozen master holds a read until the client's socket timeout: an agent
        # meets the target only with HOTSWAP_SOCKET_TIMEOUT below the node timeout.
        pytest.param("sigstop", id="sigstop", marks=pytest.mark.slow),
        pytest.param("cluster-failover", id="cluster-failover", marks=pytest.mark.slow),
    ],
)
def test_agent_rides_through_a_failover_of_the_metadata_master(
    cluster: Cluster, fault: str
) -> None:
    """Issue 16, defect 1: after the failover the agent applies the next versions in time,
    its heartbeat never lapses, and status, rollback and verify work."""
    seeds = cluster.urls()
    pub = Publisher(MODEL, settings=settings_for(seeds))
    worker: Worker | None = None
    watch: HeartbeatWatch | None = None
    try:
        assert pub.publish(state(1)) == 1
        worker = Worker(
            seeds, heartbeat_ttl=15.0, socket_timeout=2.0 if fault == "sigstop" else 10.0
        )
        worker.applied(1)
        store = pub.store
        watch = HeartbeatWatch(
            connect(settings_for(seeds)), keys.heartbeat_key(store.ns, MODEL, worker.agent_id)
        )
        head = keys.head_key(store.ns, MODEL)
        victim = cluster.owner_of(head)
        heir = cluster.replica_of(victim)
        reads_before = watch.reads

        if fault == "kill-9":
            victim.kill()
        elif fault == "sigstop":
            cluster.freeze(victim)
        else:
            cluster.failover_to(heir)
        killed = time.monotonic()
        assert cluster.poll_until_served_by(head, heir), "the replica never took over"
        finished = time.monotonic()

        v2, tries2 = publish(pub, 2)
        v3, tries3 = publish(pub, 3)
        assert (v2, v3) == (2, 3)
        assert tries2 + tries3 <= 4  # the publisher's own client follows the failover
        applied = worker.applied(3, timeout=60)
        target = 2 * cluster.node_timeout_ms / 1000 + POLL
        assert applied - finished <= target, (
            f"v3 applied {applied - finished:.1f}s after the failover (target {target}s)"
        )

        # status: the agent alive, on v3, idle. Its record may trail the apply by the
        # reporter's retry when a write met the old owner of the record's slot.
        rows: dict[str, dict[str, object]] = {}

        def status_says_v3() -> bool:
            done = hotswap_cli(seeds, "status", MODEL, "--json")
            assert done.returncode == 0, done.stderr
            rows.update({a["agent_id"]: a for a in json.loads(done.stdout)["agents"]})
            row = rows.get(worker.agent_id, {})
            return row.get("alive") is True and row.get("version") == 3 and row.get("lag") == 0

        assert poll(status_says_v3, attempts=20, pause=0.5), rows.get(worker.agent_id)
        # rollback (to v2, as v4) reaches the agent; verify passes after the failover.
        back = hotswap_cli(seeds, "rollback", MODEL, "--to", "2", "--no-wait")
        assert back.returncode == 0, back.stderr
        worker.applied(4)
        verified = hotswap_cli(seeds, "verify", MODEL)
        assert verified.returncode == 0, verified.stderr
        assert watch.reads > reads_before
        # The bound: the heartbeat never lapses for longer than the failover.
        # A read may miss it only while the failover runs, or until the agent's next
        # heartbeat write after it (a third of the TTL: reporter.py).
        late = [round(t - finished, 2) for t in watch.missing if t > finished + 15.0 / 3]
        since_kill = [round(t - killed, 2) for t in watch.missing]
        assert late == [], (
            f"the heartbeat lapsed after the failover (s after it: {late}; failover "
            f"{finished - killed:.1f}s; missing reads at {since_kill}s after the fault)"
        )
        result = worker.finish()
        assert result["mixed_count"] == 0, result["mixed"]
        digests = result["digests"]
        assert isinstance(digests, dict)
        assert_runs_exactly_one(store, digests, 4)
        assert content_of(store, 4) == content_of(store, 2)
        states = [e[1] for e in worker.seen if e[0] == "STATE"]
        assert states[-1] == "idle", states
        print(
            f"{fault}: failover {finished - killed:.2f}s, "
            f"v3 applied {applied - finished:.2f}s after; "
            f"publish attempts {tries2}+{tries3}; states {states}"
        )
    finally:
        if watch is not None:
            watch.close()
        if worker is not None:
            worker.kill()
        pub.close()
