"""Faults: Redis killed, restarted empty or frozen, a publisher killed, publishers racing.

Every test ends with the same proof: the live model is bit-equal to exactly
one published manifest (``assert_runs_exactly``), no version is visible
half-written, and every committed version is still there. Each test has its
own redis-server (append-only file fsynced on every write where data must
survive kill -9), so the session server is never disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rel_support import (
    MODEL,
    admin_store,
    agent_status,
    assert_runs_exactly,
    content,
    digests,
    eventually,
    live_copy,
    make_state,
    nudged,
    settings_for,
)

from hotswap import keys
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import StoreUnavailable, VersionConflict
from hotswap.store import Store
from publisher import plan
from publisher.publisher import Publisher
from publisher.upload import SMALL_BLOB_BYTES

pytestmark = pytest.mark.reliability
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Tensors too big for the batch of small blobs (publisher.upload.SMALL_BLOB_BYTES),
# which goes in one round trip: these tests stop an upload between tensors.
WIDE = 160
assert WIDE * WIDE * 4 > SMALL_BLOB_BYTES


@pytest.fixture
def durable() -> Iterator[EmbeddedRedis]:
    """A private server whose every write is fsynced: kill -9 loses nothing acknowledged."""
    with EmbeddedRedis(persist=True, extra_args=["--appendfsync", "always"]) as server:
        yield server


def blob_keys(store: Store) -> set[str]:
    return set(store.blobs.stored_blob_keys())


def referenced_keys(store: Store) -> set[str]:
    """Every chunk key some stored manifest points at."""
    out: set[str] = set()
    for v in store.versions():
        for blob in plan.unique_blobs(store.manifest(v).tensors):
            out.update(keys.blob_keys_of_id(store.ns, store.model, blob))
    return out


def test_redis_killed_during_upload_then_the_publish_is_retried(durable: EmbeddedRedis) -> None:
    cfg = settings_for(durable)
    first, second = make_state(1, width=WIDE), make_state(2, width=WIDE)
    live = live_copy(first)
    store = admin_store(durable)
    sent_before_kill: list[int] = []

    def kill_after_first_tensor(stage: str, done: int, total: int) -> None:
        if stage == "upload" and not sent_before_kill:
            sent_before_kill.append(done)
            durable.kill()

    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        with pytest.raises(StoreUnavailable) as caught:
            pub.publish(second, progress=kill_after_first_tensor)
        assert str(caught.value).startswith(
            f"Redis unreachable while uploading tensor 'layer01.weight' for model {MODEL!r}"
        )
        assert digests(live) == digests(first)  # serving on while Redis is gone
        durable.start()
        # Nothing of the failed publish is visible: same head, same versions, no seq taken.
        assert store.head() == v1 and store.versions() == [v1]
        assert store.client.get(keys.seq_key("hotswap", MODEL)) == b"1"
        assert [row["version"] for row in store.log()] == [str(v1)]
        total = sum(t.nbytes for t in second.values())
        v2 = pub.publish(second)  # the retry: only what was not sent before the kill
        assert v2 == v1 + 1
        assert pub.last_report.bytes_uploaded == total - sent_before_kill[0]
        assert agent.wait_for(v2, 10)
    assert_runs_exactly(store, live, v2)
    assert store.versions() == [v1, v2] and content(store.manifest(v1)) == digests(first)


class CommitFault(redis.Redis):
    """A real client whose commit script kills the server just before it is sent, or just
    after it ran (the reply then never reaches the publisher, as when a link drops)."""

    server: EmbeddedRedis
    when: str | None = None

    def register_script(self, script: str) -> Any:
        real = super().register_script(script)
        if "XADD" not in script:
            return real  # not the commit (the version reservation is a script too)

        def run(keys: Any = None, args: Any = None, client: Any = None) -> Any:
            when, self.when = self.when, None
            if when == "before":
                self.server.kill()
            result = real(keys=keys, args=args, client=client)
            if when == "after":
                self.server.kill()
                raise redis.ConnectionError("Connection closed by server.")
            return result

        return run


@pytest.mark.parametrize("when", ["before", "after"])
def test_redis_killed_during_commit(durable: EmbeddedRedis, when: str) -> None:
    cfg = settings_for(durable)
    client = CommitFault.from_url(durable.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    client.server = durable
    first, second = make_state(1), make_state(2)
    live = live_copy(first)
    store = admin_store(durable)
    with (
        Publisher(MODEL, settings=cfg, connection=client) as pub,
        Agent(live, MODEL, settings=cfg) as agent,
    ):
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        client.when = when
        with pytest.raises(StoreUnavailable, match=r"^Redis unreachable while committing v2 "):
            pub.publish(second)
        durable.start()
        if when == "before":
            # The script never ran: v2 was reserved and is burned, nothing else.
            assert store.head() == v1 and store.versions() == [v1]
            assert len(store.log()) == 1
            v = pub.publish(second)
            assert (v, pub.last_report.created) == (3, True)
        else:
            # The script ran whole before the kill: v2 is fully there, logged and
            # announced; publishing the same weights again creates nothing.
            assert store.head() == 2 and store.versions() == [v1, 2]
            assert content(store.manifest(2)) == digests(second)
            assert [row["version"] for row in store.log()] == ["2", str(v1)]
            v = pub.publish(second)
            assert (v, pub.last_report.created) == (2, False)
        assert agent.wait_for(v, 10)
    assert_runs_exactly(store, live, v)
    assert content(store.manifest(v1)) == digests(first)
    client.close()


def test_redis_killed_during_an_agents_fetch(durable: EmbeddedRedis) -> None:
    cfg = settings_for(durable)
    # Tensors over prefetch.SMALL_BLOB_BYTES: each is a read of its own, as large ones are
    # (small blobs come in one round trip before staging, and would all be in by then).
    first, second = make_state(1, tensors=12, width=160), make_state(2, tensors=12, width=160)
    live = live_copy(first)
    store = admin_store(durable)
    with Publisher(MODEL, settings=cfg) as pub:
        v1 = pub.publish(first)
        agent = Agent(live, MODEL, settings=cfg)
        real_read = agent.store.blobs.read_into
        reads: list[str] = []

        def read_then_die(
            entry: Any, out: memoryview, version: int | None = None, on_chunk: Any = None
        ) -> None:
            if version == 2:
                reads.append(entry.name)
                if len(reads) == 5:
                    durable.kill()  # 4 of v2's 12 tensors staged, the rest never arrive
            real_read(entry, out, version, on_chunk)

        agent.store.blobs.read_into = read_then_die  # type: ignore[method-assign]
        with agent:
            assert agent.wait_for(v1, 10)
            v2 = pub.publish(second)
            assert v2 == 2
            assert eventually(lambda: agent.state == "disconnected", 10)
            time.sleep(0.5)  # reconnect attempts against a dead server
            assert agent.applied_version == v1 and digests(live) == digests(first)
            durable.start()
            assert agent.wait_for(v2, 15)
            assert_runs_exactly(store, live, v2)
    assert len(reads) >= 5 + 12  # the whole version fetched again once Redis was back


def test_redis_restarted_empty() -> None:
    with EmbeddedRedis() as server:  # no persistence: a restart loses everything
        cfg = settings_for(server)
        first, second, third = make_state(1), make_state(2), make_state(3)
        live = live_copy(first)
        store = admin_store(server)
        with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
            pub.publish(first)
            v2 = pub.publish(second)
            assert agent.wait_for(v2, 10)
            server.restart()
            # Keeps serving v2 and says in its status record that head is gone.
            assert eventually(
                lambda: (
                    "has no head in Redis"
                    in (getattr(agent_status(store, agent.agent_id), "last_error", "") or "")
                ),
                10,
            )
            record = agent_status(store, agent.agent_id)
            assert record is not None and record.version == v2
            assert f"still serving v{v2}" in (record.last_error or "")
            assert agent.applied_version == v2 and digests(live) == digests(second)
            v = pub.publish(third)  # v1 of a new lineage: applied by digest
            assert v == 1
            assert eventually(lambda: agent.applied_version == 1, 10)
        assert_runs_exactly(store, live, 1)
        assert store.versions() == [1]


@pytest.mark.parametrize("when", ["before the publish", "mid-upload"])
def test_redis_frozen_longer_than_the_client_timeout(when: str) -> None:
    with EmbeddedRedis() as server:
        cfg = settings_for(server, socket_timeout=0.5, connect_timeout=0.5, retry_max_wait=0.1)
        first, second = make_state(1, width=WIDE), make_state(2, width=WIDE)
        live = live_copy(first)
        store = admin_store(server)
        started: list[float] = []

        def freeze_now() -> None:
            server.freeze()
            started.append(time.monotonic())

        def freeze_after_first_tensor(stage: str, done: int, total: int) -> None:
            if stage == "upload" and not started:
                freeze_now()

        with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
            v1 = pub.publish(first)
            assert agent.wait_for(v1, 10)
            try:
                if when == "before the publish":
                    freeze_now()
                with pytest.raises(StoreUnavailable) as caught:
                    pub.publish(second, progress=freeze_after_first_tensor)
                took = time.monotonic() - started[0]
                assert eventually(lambda: agent.state == "disconnected", 10)
            finally:
                server.thaw()
            doing = (
                "reading head"
                if when == "before the publish"
                else ("uploading tensor 'layer01.weight'")
            )
            text = str(caught.value)
            assert text.startswith(
                f"Redis unreachable while {doing} for model {MODEL!r} (TimeoutError: "
            ) and text.endswith("check HOTSWAP_REDIS_URL and the server")
            # Three attempts of at most 0.5 s each, with short backoff in between.
            assert 1.4 < took < 6.0, took
            # The agent recovers by itself; nothing of the failed publish is visible;
            # the publisher's next call just works.
            assert eventually(lambda: agent.state == "idle", 15)
            assert store.head() == v1 and store.versions() == [v1]
            assert digests(live) == digests(first)
            v2 = pub.publish(second)
            assert agent.wait_for(v2, 10)
        assert_runs_exactly(store, live, v2)


def test_publisher_process_killed_mid_upload_leaves_only_orphans_for_gc(
    durable: EmbeddedRedis,
) -> None:
    cfg = settings_for(durable)
    first = make_state(1, width=WIDE)
    live = live_copy(first)
    store = admin_store(durable)
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        before = blob_keys(store)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        script = str(HERE / "publish_child.py")
        child = subprocess.Popen(
            [sys.executable, script, durable.url, MODEL, "9", "6", f"{WIDE}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline().decode()
            assert line.startswith("UPLOADING"), (line, child.stderr.read() if child.stderr else "")
            child.kill()
        finally:
            child.kill()
            child.wait()
            for pipe in (child.stdout, child.stderr):
                if pipe is not None:
                    pipe.close()
        assert child.returncode == -9
        orphans = blob_keys(store) - before
        assert 0 < len(orphans) < 6  # some of the child's 6 tensors, not all
        assert store.head() == v1 and store.versions() == [v1] and len(store.log()) == 1
        # The child indexed all 6 of its blobs before uploading: gc inside the grace
        # period keeps them (a publish may be in flight) ...
        report = pub.gc()
        assert (report.blobs_deleted, report.deleted_versions) == (0, [])
        assert report.blobs_kept_young == 6
        # ... and after it (grace 0 here) removes exactly the orphans.
        with Publisher(MODEL, settings=settings_for(durable, gc_grace_seconds=0)) as late:
            report = late.gc()
        assert (report.blobs_deleted, report.chunks_deleted) == (6, len(orphans))
        assert blob_keys(store) == before == referenced_keys(store)
        assert set(store.blobs.blob_index()) == set(plan.unique_blobs(store.manifest(v1).tensors))
        assert pub.verify(v1).ok
        again = make_state(9, 6, WIDE)
        v2 = pub.publish(again)
        assert agent.wait_for(v2, 10)
    assert_runs_exactly(store, live, v2)


ROUNDS = 100


def test_two_publishers_racing(durable: EmbeddedRedis) -> None:
    cfg = settings_for(durable)
    base = make_state(1)
    live = live_copy(base)
    store = admin_store(durable)
    barrier = threading.Barrier(2)
    outcomes: dict[str, list[tuple[int, int | None]]] = {"a": [], "b": []}
    published: dict[int, dict[str, str]] = {}
    errors: list[BaseException] = []
    refusals: list[str] = []

    def racer(who: str, offset: float) -> Callable[[], None]:
        def run() -> None:
            with Publisher(MODEL, settings=cfg) as pub:
                for r in range(ROUNDS):
                    state = nudged(base, offset + r * 1e-3)
                    try:
                        barrier.wait(10)
                        v = pub.publish(state, message=f"{who} round {r}")
                    except VersionConflict as e:
                        refusals.append(str(e))
                        outcomes[who].append((r, None))
                    except BaseException as e:
                        errors.append(e)
                        barrier.abort()
                        raise
                    else:
                        outcomes[who].append((r, v))
                        published[v] = digests(state)

        return run

    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        pub.publish(base)
        threads = [
            threading.Thread(target=racer("a", 1e-4)),
            threading.Thread(target=racer("b", 2e-4)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors
        head = store.head()
        assert head is not None and agent.wait_for(head, 15)
    wins = {who: [v for _r, v in rows if v is not None] for who, rows in outcomes.items()}
    conflicts = sum(v is None for rows in outcomes.values() for _r, v in rows)
    per_round = [sum(rows[r][1] is not None for rows in outcomes.values()) for r in range(ROUNDS)]
    print(f"\nracing: {ROUNDS} rounds, {len(published)} commits, {conflicts} conflicts")
    assert len(published) + conflicts == 2 * ROUNDS
    assert min(per_round) >= 1 and conflicts > 0
    assert all("another publisher committed first, publish again" in r for r in refusals)
    for versions in wins.values():
        assert versions == sorted(set(versions))  # strictly increasing per publisher
    # Every commit is still there with exactly the weights its publisher sent.
    assert store.versions() == [1, *sorted(published)]
    for v, sent in published.items():
        assert content(store.manifest(v)) == sent
    assert len(store.log(1000)) == 1 + len(published)
    assert head == max(published)
    assert_runs_exactly(store, live, head)
