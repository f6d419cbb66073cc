"""Retention: the pure plan, then gc against the test Redis."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import redis
import torch
from polling import until

from hotswap import blobs, keys
from hotswap import status as st
from hotswap.errors import ConfigError, NotFound
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.gc import collectable, plan_retention
from publisher.plan import unique_blobs
from publisher.publisher import Publisher

# -- pure -------------------------------------------------------------------------


def test_retention_keeps_newest_head_and_running() -> None:
    p = plan_retention([1, 2, 3, 4, 5, 6], head=6, keep=2, running=[2, 9])
    assert p.keep == [2, 5, 6]
    assert p.delete == [1, 3, 4]
    assert p.reasons[2] == ["an agent runs it"]
    assert p.reasons[6] == ["newest 2", "head"]


def test_retention_keeps_head_even_if_older_versions_are_newer() -> None:
    # A head that is not the newest stored number (a newer commit was lost).
    p = plan_retention([1, 2, 3], head=1, keep=1, running=[])
    assert p.keep == [1, 3] and p.delete == [2]


def test_retention_edge_cases() -> None:
    assert plan_retention([], head=None, keep=3, running=[4]).keep == []
    assert plan_retention([3, 1, 2], head=3, keep=10, running=[]).delete == []
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        plan_retention([1], head=1, keep=0, running=[])


def test_collectable_respects_references_and_grace() -> None:
    now = 1000.0
    scores = {"old": 10.0, "ref": 10.0, "young": 990.0, "gone": None, "edge": 900.0}
    assert collectable(scores, referenced={"ref"}, now=now, grace=100.0) == ["old"]
    assert collectable(scores, referenced=set(), now=now, grace=0.0) == [
        "edge",
        "old",
        "ref",
        "young",
    ]


# -- against Redis -------------------------------------------------------------------


def sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.arange(64, dtype=torch.float32)  # identical in every version
    return {"w": torch.randn(32, 32, generator=g), "shared": shared}


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings, connection=client)
    yield p
    p.close()


def age_all_blobs(client: redis.Redis, seconds: float = 10_000.0) -> None:
    index = keys.blob_index_key("hotswap", "m")
    old = time.time() - seconds
    client.zadd(index, {m: old for m in client.zrange(index, 0, -1)})


def chunk_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(match=keys.blob_prefix("hotswap", "m") + "*"))


def publish_versions(pub: Publisher, n: int) -> None:
    for seed in range(n):
        pub.publish(sd(seed), message=f"v{seed + 1}")


def test_gc_keeps_newest_and_deletes_the_rest(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 5)
    age_all_blobs(client)
    report = pub.gc(keep=2)
    assert report.kept == [4, 5] and report.deleted_versions == [1, 2, 3]
    assert store.versions() == [4, 5]
    # Blobs of v1-v3's "w" are gone; "shared" (in every version) and v4/v5 remain.
    assert report.blobs_deleted == 3
    wanted = set().union(*(unique_blobs(store.manifest(v).tensors) for v in (4, 5)))
    assert set(store.blobs.blob_index()) == wanted
    left = {k.decode().split(":blob:")[1].rsplit(":", 1)[0] for k in chunk_keys(client)}
    assert {b.rsplit(":", 1)[0] for b in wanted} == left
    for v in (4, 5):
        assert pub.verify(v).ok
    entry = store.log(1)[0]
    assert entry["kind"] == "gc" and entry["versions_deleted"] == "1,2,3"
    assert entry["blobs_deleted"] == "3"


def test_gc_default_keep_comes_from_settings(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    s = settings.model_copy(update={"keep_versions": 3})
    with Publisher("m", settings=s, connection=client) as p:
        publish_versions(p, 5)
        assert p.gc().kept == [3, 4, 5]
    assert store.versions() == [3, 4, 5]


def test_gc_keeps_what_live_agents_run_but_not_dead_ones(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 5)
    live = st.AgentStatus("live", "h", os.getpid(), state="idle", version=2, updated=time.time())
    dead = st.AgentStatus("dead", "h", 1, state="idle", version=1, updated=time.time())
    store.write_agent_status("live", st.encode(live), ttl=60)
    store.write_agent_status("dead", st.encode(dead), ttl=0.05)
    dead_beat = keys.heartbeat_key("hotswap", "m", "dead")
    assert until(lambda: not client.exists(dead_beat), attempts=500), "heartbeat never expired"
    age_all_blobs(client)
    report = pub.gc(keep=1)
    assert report.kept == [2, 5] and report.deleted_versions == [1, 3, 4]
    assert pub.verify(2).ok


def test_grace_period_protects_young_blobs(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 3)
    chunks = chunk_keys(client)
    report = pub.gc(keep=1)  # default grace: one hour
    assert report.deleted_versions == [1, 2]
    assert report.blobs_deleted == 0 and report.blobs_kept_young == 2
    assert report.bytes_freed == 0
    assert chunk_keys(client) == chunks


def test_dry_run_deletes_nothing(pub: Publisher, store: Store, client: redis.Redis) -> None:
    publish_versions(pub, 3)
    age_all_blobs(client)
    before = {k: client.dump(k) for k in client.keys("*")}
    report = pub.gc(keep=1, dry_run=True)
    assert report.dry_run and report.deleted_versions == [1, 2] and report.blobs_deleted == 2
    assert report.bytes_freed == 2 * 32 * 32 * 4  # v1's and v2's "w": what deleting would free
    assert {k: client.dump(k) for k in client.keys("*")} == before
    done = pub.gc(keep=1)  # then deleting frees what the dry run said
    assert done.blobs_deleted == 2 and done.bytes_freed == report.bytes_freed


def test_publish_touch_rescues_a_blob_from_gc(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 2)
    age_all_blobs(client)
    pub.publish(sd(0), message="v1's weights again")  # touches v1's blobs: young again
    report = pub.gc(keep=1)
    assert report.deleted_versions == [1, 2]
    assert pub.verify(3).ok


def test_rollback_to_collected_version_fails_clearly(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 4)
    age_all_blobs(client)
    pub.gc(keep=2)
    head = client.get(keys.head_key("hotswap", "m"))
    with pytest.raises(
        NotFound,
        match=r"^cannot roll back model 'm' to v1: its manifest was collected by gc "
        r"\(or never committed\); see `hotswap log`$",
    ):
        pub.rollback(to=1)
    assert client.get(keys.head_key("hotswap", "m")) == head
    assert store.versions() == [3, 4]


def test_rollback_to_version_whose_blobs_were_collected(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    publish_versions(pub, 2)
    w = unique_blobs([store.manifest(1).by_name()["w"]])
    store.blobs.delete_blobs(list(w))
    with pytest.raises(
        NotFound,
        match=r"^cannot roll back model 'm' to v1: blobs of 1 tensors \(e\.g\. 'w'\) were "
        r"collected by gc; publish those weights again instead$",
    ):
        pub.rollback(to=1)
    assert store.head() == 2 and store.versions() == [1, 2]


def test_gc_refuses_keep_below_one(pub: Publisher, store: Store) -> None:
    publish_versions(pub, 2)
    with pytest.raises(ConfigError, match=r"^--keep must be at least 1, got 0$"):
        pub.gc(keep=0)
    assert store.versions() == [1, 2]


# -- hostile blob index entries (issue 13, defect 4) ---------------------------------

FFF = "f" * 64
# Index members a publish never writes: each names why it is refused.
MALFORMED = {
    "garbage": "not digest:chunk_bytes:chunks",
    "x:y:z": "not digest:chunk_bytes:chunks",
    f"{'F' * 64}:65536:1": "digest is not 64 lowercase hex characters",
    f"{FFF}:65536:0": "declares 0 chunks",
    f"{FFF}:65536:1:7": "not digest:chunk_bytes:chunks",
    f"{FFF}:1:68719476736": "chunk size 1 is outside 4096-536870912",
    f"{FFF}:65536:1048577": "1048577 chunks of 65536 bytes exceed the 68719476736-byte "
    "tensor limit",
}


def test_gc_skips_and_reports_malformed_blob_index_entries(
    pub: Publisher, store: Store, client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A member `garbage` made gc fail with `internal error: ValueError`; one declaring
    64 Gi one-byte chunks made it build 64 Gi key names (3 GB in 5 s)."""
    from publisher import cli

    publish_versions(pub, 3)
    index = keys.blob_index_key("hotswap", "m")
    client.zadd(index, dict.fromkeys(MALFORMED, 1.0))
    age_all_blobs(client)
    report = pub.gc(keep=1)
    # The rest of gc ran as usual: v1 and v2 and their own blobs are gone.
    assert report.deleted_versions == [1, 2] and report.blobs_deleted == 2
    assert pub.verify(3).ok
    assert report.malformed_index == len(MALFORMED)
    first = sorted(MALFORMED)[:5]
    assert report.malformed_examples == {m: MALFORMED[m] for m in first}
    # Skipped, not deleted: gc leaves what it does not understand to the operator.
    assert set(MALFORMED) <= {m.decode() for m in client.zrange(index, 0, -1)}
    for blob, why in MALFORMED.items():
        assert keys.blob_id_problem(blob, 64 * 1024**3) == why
    code = cli.main(["--redis-url", pub.settings.redis_url, "gc", "m", "--keep", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert " ".join(out.out.split()) == (
        "model m: kept v3; deleted no versions and 0 blobs (0 bytes); "
        f"skipped {len(MALFORMED)} malformed blob index entries "
        f"(e.g. '{first[0]}': {MALFORMED[first[0]]}), left in place: look at them with "
        "ZRANGE hotswap:{m}:blobs 0 -1 and remove them with ZREM"
    )


def test_gc_deletes_a_blob_of_many_chunks_in_bounded_batches(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    """An id of several deletion rounds: rounds are probed at both ends in one round
    trip and only those holding chunks are deleted, one UNLINK each."""
    publish_versions(pub, 1)
    batch = blobs.DELETE_BATCH
    many = f"{FFF}:4096:{batch * 3 + 5}"
    client.zadd(keys.blob_index_key("hotswap", "m"), {many: 1.0})
    stored = [0, 1, batch * 2, batch * 3 + 4]  # rounds 0, 2 and 3 hold chunks
    for i in stored:
        client.set(keys.blob_key("hotswap", "m", FFF, 4096, i), b"x")
    client.config_resetstat()
    report = pub.gc(keep=1)
    assert report.blobs_deleted == 1 and report.chunks_deleted == len(stored)
    assert report.malformed_index == 0
    stats = client.info("commandstats")
    assert stats["cmdstat_unlink"]["calls"] == 3  # one per round that held chunks
    assert stats["cmdstat_exists"]["calls"] == 4  # each round's two ends, pipelined
    assert many.encode() not in client.zrange(keys.blob_index_key("hotswap", "m"), 0, -1)
    assert not client.keys(f"hotswap:m:blob:{FFF}:*")


def test_gc_of_an_id_naming_millions_of_absent_chunks_costs_one_probe(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    """The largest id the limits allow (64 GiB in 4 KiB chunks: 16,777,216 chunks) and
    nothing stored: before, one key list of every chunk; a round of UNLINKs each would
    still take 2,048 round trips. Now one pipeline of EXISTS, no UNLINK."""
    publish_versions(pub, 1)
    count = 64 * 1024**3 // 4096
    huge = f"{FFF}:4096:{count}"
    client.zadd(keys.blob_index_key("hotswap", "m"), {huge: 1.0})
    client.config_resetstat()
    report = pub.gc(keep=1)
    assert report.blobs_deleted == 1 and report.chunks_deleted == 0
    stats = client.info("commandstats")
    assert "cmdstat_unlink" not in stats
    assert stats["cmdstat_exists"]["calls"] == count // blobs.DELETE_BATCH
    assert huge.encode() not in client.zrange(keys.blob_index_key("hotswap", "m"), 0, -1)
