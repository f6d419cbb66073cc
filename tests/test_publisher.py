"""Publisher against the test Redis: publish, only-changed uploads, --only, rollback."""

from __future__ import annotations

import pytest
import redis
import torch

from hotswap import keys
from hotswap.errors import ConfigError, NotFound, SourceError, VersionConflict
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layer.0.weight": torch.randn(32, 32, generator=g),
        "layer.0.bias": torch.randn(32, generator=g),
        "layer.1.weight": torch.randn(32, 32, generator=g),
        "layer.1.bias": torch.randn(32, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Publisher:
    p = Publisher("m", settings=settings, connection=client)
    yield p  # type: ignore[misc]
    p.close()


def blob_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(match=keys.blob_prefix("hotswap", "m") + "*"))


def test_first_publish_uploads_everything(pub: Publisher, store: Store) -> None:
    sd = weights()
    v = pub.publish(sd, message="first")
    r = pub.last_report
    total = sum(t.nbytes for t in sd.values())
    assert (v, r.version, r.parent, r.created) == (1, 1, None, True)
    assert (r.tensors_total, r.tensors_changed) == (6, 6)
    assert (r.bytes_total, r.bytes_uploaded, r.bytes_skipped) == (total, total, 0)
    m = store.manifest(1)
    assert m.message == "first" and m.kind == "publish" and "@" in m.author
    assert [e.name for e in m.tensors] == sorted(sd)
    assert store.head() == 1


def test_identical_publish_creates_nothing_unless_forced(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights())
    before = client.dbsize()
    assert pub.publish(weights()) == 1
    assert pub.last_report.created is False
    assert pub.last_report.bytes_uploaded == 0
    assert store.head() == 1 and client.dbsize() == before
    assert pub.publish(weights(), force=True) == 2
    assert pub.last_report.bytes_uploaded == 0
    assert store.manifest(2).tensors == store.manifest(1).tensors


def test_changed_tensor_uploads_only_its_bytes(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    sd = weights()
    pub.publish(sd)
    before = blob_keys(client)
    sd["layer.1.weight"] = sd["layer.1.weight"] * 2
    assert pub.publish(sd) == 2
    r = pub.last_report
    assert r.tensors_changed == 1
    assert r.bytes_uploaded == sd["layer.1.weight"].nbytes
    assert r.bytes_skipped == r.bytes_total - r.bytes_uploaded
    assert len(blob_keys(client) - before) == 1  # 4 KiB: one chunk
    old, new = store.manifest(1).by_name(), store.manifest(2).by_name()
    assert [n for n in new if new[n] != old[n]] == ["layer.1.weight"]


def test_only_inherits_the_rest(pub: Publisher, store: Store) -> None:
    sd = weights()
    pub.publish(sd)
    partial = {"layer.0.weight": sd["layer.0.weight"] + 1, "layer.0.bias": sd["layer.0.bias"]}
    v = pub.publish(partial, only=["layer.0.*"])
    assert pub.last_report.tensors_changed == 1
    old, new = store.manifest(1).by_name(), store.manifest(v).by_name()
    assert set(new) == set(old)
    assert new["layer.0.weight"] != old["layer.0.weight"]
    assert all(new[n] == old[n] for n in new if n != "layer.0.weight")


def test_only_glob_matching_nothing_is_refused(pub: Publisher, store: Store) -> None:
    pub.publish(weights())
    with pytest.raises(SourceError, match=r"^state dict: --only 'nope\.\*' matches no tensor$"):
        pub.publish(weights(1), only=["nope.*"])
    assert store.head() == 1


def test_only_without_parent_is_refused(pub: Publisher, store: Store) -> None:
    with pytest.raises(ConfigError, match="has no version yet: --only needs a parent"):
        pub.publish(weights(), only=["layer.*"])
    assert store.head() is None


def test_tied_tensors_share_blobs_and_upload_once(pub: Publisher, store: Store) -> None:
    sd = weights()
    sd["lm_head.weight"] = sd["embed.weight"]  # tied: same storage, two names
    pub.publish(sd)
    m = store.manifest(1).by_name()
    assert m["lm_head.weight"].digest == m["embed.weight"].digest
    assert m["lm_head.weight"].name == "lm_head.weight"
    tied = sd["embed.weight"].nbytes
    assert pub.last_report.bytes_uploaded == pub.last_report.bytes_total - tied


def test_rollback_restores_entries_and_uploads_nothing(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    sd = weights()
    pub.publish(sd)
    sd["embed.weight"] = sd["embed.weight"] + 1
    pub.publish(sd)
    blobs = blob_keys(client)
    v = pub.rollback()
    assert v == 3 and store.head() == 3
    m = store.manifest(3)
    assert (m.kind, m.rollback_to, m.parent) == ("rollback", 1, 2)
    assert m.tensors == store.manifest(1).tensors
    assert pub.last_report.bytes_uploaded == 0 and pub.last_report.kind == "rollback"
    assert blob_keys(client) == blobs
    # Rolling back a rollback goes to the version stored before it.
    assert pub.rollback() == 4
    assert store.manifest(4).rollback_to == 2
    assert store.manifest(4).tensors == store.manifest(2).tensors


def test_rollback_errors(pub: Publisher, store: Store) -> None:
    with pytest.raises(NotFound, match=r"^model 'm' has no versions: nothing to roll back$"):
        pub.rollback()
    pub.publish(weights())
    with pytest.raises(NotFound, match="v1 has no earlier stored version"):
        pub.rollback()
    with pytest.raises(NotFound, match=r"^model 'm' has no version 9 \(head is v1\)$"):
        pub.rollback(to=9)
    with pytest.raises(ConfigError, match="v1 is already the head"):
        pub.rollback(to=1)
    assert store.head() == 1 and store.versions() == [1]


def test_concurrent_publisher_gets_version_conflict(
    pub: Publisher, settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    pub.publish(weights())
    other = Publisher("m", settings=settings, connection=client)
    fired = []

    def race(phase: str, done: int, total: int) -> None:
        if phase == "upload" and not fired:
            fired.append(other.publish(weights(2)))

    with pytest.raises(VersionConflict, match="head is v2, not v1 as this publish read it"):
        pub.publish(weights(1), progress=race)
    assert fired == [2] and store.head() == 2 and store.versions() == [1, 2]
