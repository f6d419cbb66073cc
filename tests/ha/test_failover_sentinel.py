"""A fleet rides through a primary failover under Redis Sentinel (issue 16).

One topology for the module (``sentinel_set``: a primary, one replica, three
sentinels); each test leaves it whole again. The serving process is
``ha_worker.py``, a process of its own; the publisher, the CLI and the agent
name the deployment by its sentinels only. Every failover test ends with the
check of docs/reliability.md: the live model bit-equal to exactly one
published version, never a mix.
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
from ha_process import EventWorker, HeartbeatWatch, content_of, publish, state
from sentinel_support import DOWN_AFTER_MS, SERVICE, SentinelSet
from waiting import poll

from hotswap import keys
from hotswap.connection import connect
from hotswap.sentinel import replica_client
from hotswap.settings import HotswapSettings
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]

MODEL = "ha-sentinel"
POLL = 0.5
HEARTBEAT_TTL = 15.0
WORKER = Path(__file__).with_name("ha_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelSet]:
    with SentinelSet() as sentinel_set:
        yield sentinel_set


@pytest.fixture
def sentinel_set(topology: SentinelSet) -> SentinelSet:
    """The module's deployment, whole (the last test's faults healed) and empty."""
    topology.restore()
    topology.flush()
    return topology


def settings_for(url: str, **more: object) -> HotswapSettings:
    return HotswapSettings(
        redis_url=url,
        chunk_bytes=64 * 1024,
        poll_interval=POLL,
        retry_attempts=4,
        retry_max_wait=0.5,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
        **more,
    )


def hotswap_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as its own process, with ``env``'s HOTSWAP_* settings and no others."""
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")},
            "HOTSWAP_RETRY_ATTEMPTS": "3",
            "HOTSWAP_CONNECT_TIMEOUT": "1",
            "HOTSWAP_SOCKET_TIMEOUT": "2",
            "PYTHONPATH": str(ROOT),
            **env,
        },
        cwd="/",
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


class Worker(EventWorker):
    """``ha_worker.py`` in its own process; its event lines land in ``seen``."""

    def __init__(self, url: str) -> None:
        super().__init__(
            WORKER,
            *(url, MODEL, "--no-cluster", "--poll", str(POLL)),
            *("--heartbeat-ttl", str(HEARTBEAT_TTL), "--socket-timeout", "2.0"),
        )


def test_losing_any_one_sentinel_loses_nothing(sentinel_set: SentinelSet) -> None:
    """With the sentinel every client asks first dead, new clients (a publisher, the
    CLI by separate settings, a replica reader) find the deployment through the others."""
    dead = sentinel_set.sentinels[0]
    dead.kill()
    with Publisher(MODEL, settings=settings_for(sentinel_set.url())) as pub:
        assert pub.publish(state(1)) == 1
        assert pub.store.head() == 1
        head = keys.head_key(pub.store.ns, MODEL)
    by_settings = {
        "HOTSWAP_SENTINELS": sentinel_set.addresses(),  # the dead one first
        "HOTSWAP_SENTINEL_MASTER": SERVICE,
    }
    done = hotswap_cli(by_settings, "status", MODEL, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["head"] == 1
    reader = replica_client(settings_for(sentinel_set.url()))
    try:
        assert reader.execute_command("ROLE")[0] == b"slave"
        assert poll(lambda: reader.get(head) is not None, attempts=250), "replica never had head"
    finally:
        reader.close()


@pytest.mark.parametrize(
    "fault",
    [
        "kill-9",
        # A frozen primary holds each read until the client's socket timeout (2 s here,
        # under down-after-milliseconds), and takes writes again for a while once thawed.
        pytest.param("sigstop", marks=pytest.mark.slow),
        "sentinel-failover",
    ],
)
def test_agent_rides_through_a_primary_failover(sentinel_set: SentinelSet, fault: str) -> None:
    """After the failover the agent applies the next versions in time, its heartbeat
    never lapses, and status, rollback and verify work."""
    url = sentinel_set.url()
    pub = Publisher(MODEL, settings=settings_for(url))
    worker: Worker | None = None
    watch: HeartbeatWatch | None = None
    try:
        assert pub.publish(state(1)) == 1
        worker = Worker(url)
        worker.applied(1)
        assert publish(pub, 2)[0] == 2
        worker.applied(2)
        store = pub.store
        watch = HeartbeatWatch(
            connect(settings_for(url)), keys.heartbeat_key(store.ns, MODEL, worker.agent_id)
        )
        victim, heir = sentinel_set.primary(), sentinel_set.replica()
        reads_before = watch.reads

        if fault == "kill-9":
            victim.kill()
        elif fault == "sigstop":
            sentinel_set.freeze(victim)
        else:
            sentinel_set.sentinel_failover()
        began = time.monotonic()
        assert sentinel_set.poll_until_primary(heir), "the replica never took over"
        finished = time.monotonic()

        v3, tries3 = publish(pub, 3)
        v4, tries4 = publish(pub, 4)
        assert (v3, v4) == (3, 4)
        assert tries3 + tries4 <= 3  # the publisher's own client follows the failover
        applied = worker.applied(4, timeout=60)
        target = 2 * DOWN_AFTER_MS / 1000 + POLL
        assert applied - finished <= target, (
            f"v4 applied {applied - finished:.1f}s after the failover (target {target}s)"
        )

        # status: the agent alive, on v4, idle (its record may trail the apply by one
        # reporter write).
        rows: dict[str, dict[str, object]] = {}
        cli = {"HOTSWAP_REDIS_URL": url}

        def status_says_v4() -> bool:
            done = hotswap_cli(cli, "status", MODEL, "--json")
            assert done.returncode == 0, done.stderr
            rows.update({a["agent_id"]: a for a in json.loads(done.stdout)["agents"]})
            row = rows.get(worker.agent_id, {})
            return row.get("alive") is True and row.get("version") == 4 and row.get("lag") == 0

        assert poll(status_says_v4, attempts=20, pause=0.5), rows.get(worker.agent_id)
        # rollback (to v3, as v5) by a publisher started after the failover reaches the
        # agent, and verify passes (in this process: the CLI's torch import is the
        # slowest step of the test; the CLI's own connection is checked by status).
        with Publisher(MODEL, settings=settings_for(url)) as later:
            assert later.rollback(to=3) == 5
            rolled_back = worker.applied(5)
            assert later.verify(5).ok
        # The agent settles after the apply (its state watcher reports each change).
        worker.wait(lambda e: e[:2] == ["STATE", "idle"] and float(e[2]) >= rolled_back)
        assert watch.reads > reads_before
        # The bound: the heartbeat never lapses for longer than the failover.
        # A read may miss it only while the failover runs, or until the agent's next
        # heartbeat write after it (a third of the TTL: reporter.py).
        late = [round(t - finished, 2) for t in watch.missing if t > finished + HEARTBEAT_TTL / 3]
        assert late == [], (
            f"the heartbeat lapsed after the failover (s after it: {late}; failover "
            f"{finished - began:.1f}s)"
        )
        result = worker.finish()
        assert result["mixed_count"] == 0, result["mixed"]
        digests = result["digests"]
        assert isinstance(digests, dict)
        matching = [v for v in store.versions() if content_of(store, v) == digests]
        assert 5 in matching and content_of(store, 5) == content_of(store, 3), matching
        states = [e[1] for e in worker.seen if e[0] == "STATE"]
        assert states[-1] == "idle", states
        print(
            f"{fault}: failover {finished - began:.2f}s, v4 applied {applied - finished:.2f}s "
            f"after (target {target}s); publish attempts {tries3}+{tries4}; states {states}"
        )
    finally:
        if watch is not None:
            watch.close()
        if worker is not None:
            worker.kill()
        pub.close()
