"""Publisher against the test Redis: publish, only-changed uploads, --only, rollback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from pydantic import SecretStr
from safetensors.torch import save_file

from hotswap import codec, keys
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import (
    ConfigError,
    NotFound,
    SignatureError,
    SourceError,
    StoreUnavailable,
    ValidationError,
    VersionConflict,
)
from hotswap.manifest import Manifest, TensorEntry, key_id
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import plan
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
    # New random values: a full blob (a small step is a delta: test_publish_delta.py).
    sd["layer.1.weight"] = torch.randn(32, 32, generator=torch.Generator().manual_seed(9))
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


def test_a_second_rollback_skips_what_the_first_retracted(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights(0))  # good
    pub.publish(weights(1))  # bad
    assert pub.rollback() == 3 and pub.last_report.skipped == {}
    # v2 was retracted by v3, and v1 is what v3 holds: nothing earlier to go to.
    before = redis_dump(client)
    with pytest.raises(NotFound) as e:
        pub.rollback()
    assert str(e.value) == (
        "model 'm': no earlier version to roll back to from v3 (skipped v2: retracted by v3; "
        "v1: holds what v3 holds); pass --to VERSION (to=...) to pick one"
    )
    assert redis_dump(client) == before
    pub.publish(weights(2))  # v4, good
    pub.publish(weights(3))  # v5, bad
    assert pub.rollback() == 6 and store.manifest(6).rollback_to == 4
    # Never back to v5, which v6 retracted, nor to v4, which v6 already runs.
    assert pub.rollback() == 7
    r = pub.last_report
    assert (r.rollback_to, r.skipped) == (3, {5: "retracted by v6", 4: "holds what v6 holds"})
    assert store.manifest(7).tensors == store.manifest(1).tensors
    note = "v5: retracted by v6; v4: holds what v6 holds"
    assert store.manifest(7).message == f"rollback to v3 (skipped {note})"
    assert store.log(1)[0]["skipped"] == note
    # A named target is taken as given.
    assert pub.rollback(to=5) == 8 and pub.last_report.skipped == {}


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


def blobs_that_lie(client: redis.Redis) -> list[str]:
    """Digests of stored blobs whose chunks, joined in order, do not hash to that digest."""
    chunks: dict[str, dict[int, bytes]] = {}
    for key in blob_keys(client):
        digest, _size, index = key.decode().rsplit(":", 3)[-3:]
        value = client.get(key)
        assert isinstance(value, bytes)
        chunks.setdefault(digest, {})[int(index)] = value
    return sorted(
        d
        for d, parts in chunks.items()
        if codec.digest(b"".join(v for _, v in sorted(parts.items()))) != d
    )


CHANGED = (
    r"^state dict: tensor '{}'{} changed while it was being published; "
    "publish again once it is stable$"
)


def test_tensor_changed_after_hashing_is_refused_and_its_blob_deleted(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights())
    sd = weights(1)
    stale = codec.digest(codec.as_bytes(sd["layer.0.weight"]))

    def train_step(phase: str, done: int, total: int) -> None:
        if phase == "hash" and done == total:
            sd["layer.0.weight"].add_(1)  # the caller's live memory, in place

    with pytest.raises(SourceError, match=CHANGED.format(r"layer\.0\.weight", "")):
        pub.publish(sd, progress=train_step)
    assert store.head() == 1 and store.versions() == [1]
    assert not any(stale in k.decode() for k in blob_keys(client))
    assert blobs_that_lie(client) == []
    # Once the tensor holds still, the same publish goes through.
    assert pub.publish(sd) == 2 and pub.verify(2).ok


def test_tensor_changed_during_its_upload_is_refused(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights())
    sd = weights(1)
    fired: list[int] = []

    def train_step(phase: str, done: int, total: int) -> None:
        # After the first tensor's bytes went out, before they are hashed again.
        if phase == "upload" and not fired:
            fired.append(done)
            with torch.no_grad():
                for t in sd.values():
                    t.add_(1)

    with pytest.raises(SourceError, match=CHANGED.format(r"embed\.weight", r" \(and 1 more\)")):
        pub.publish(sd, progress=train_step)
    assert fired == [sd["embed.weight"].nbytes]
    assert store.head() == 1 and store.versions() == [1]
    assert blobs_that_lie(client) == []


def test_checkpoint_file_rewritten_in_place_mid_publish_is_refused(
    pub: Publisher, store: Store, client: redis.Redis, tmp_path: Path
) -> None:
    # safetensors maps the file: bytes written in place show through the loaded
    # tensors, so a file source is no more immutable than a state dict.
    path = tmp_path / "m.safetensors"
    save_file(weights(), str(path))
    data = path.read_bytes()
    offset = data.index(codec.as_bytes(weights()["layer.1.weight"]).tobytes())

    def overwrite(phase: str, done: int, total: int) -> None:
        if phase == "hash" and done == total:
            with path.open("r+b") as f:
                f.seek(offset)
                f.write(bytes(64))

    with pytest.raises(
        SourceError, match=r"m\.safetensors: tensor 'layer\.1\.weight' changed while"
    ):
        pub.publish(path, progress=overwrite)
    assert store.head() is None and blobs_that_lie(client) == []


# -- files, signing, progress, verify -------------------------------------------------


def test_publish_files_in_process(pub: Publisher, store: Store, tmp_path: Path) -> None:
    sd = weights()
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert pub.publish(tmp_path / "m.safetensors") == 1
    torch.save(sd, tmp_path / "m.pt")
    assert pub.publish(str(tmp_path / "m.pt")) == 1  # same bytes: no new version
    assert pub.last_report.created is False
    m = store.manifest(1).by_name()
    for name, t in sd.items():
        buf = bytearray(t.nbytes)
        store.blobs.read_into(m[name], memoryview(buf))
        assert bytes(buf) == t.numpy().tobytes()


def test_tied_tensors_in_a_pt_file_upload_once(
    pub: Publisher, store: Store, tmp_path: Path
) -> None:
    w = torch.randn(64, 64)
    torch.save({"embed.weight": w, "lm_head.weight": w, "b": torch.ones(4)}, tmp_path / "t.pt")
    pub.publish(tmp_path / "t.pt")
    assert pub.last_report.bytes_uploaded == w.nbytes + 16
    m = store.manifest(1).by_name()
    assert m["embed.weight"].digest == m["lm_head.weight"].digest


def test_signed_manifest(settings: HotswapSettings, client: redis.Redis, store: Store) -> None:
    s = settings.model_copy(update={"signing_keys": [SecretStr("k1"), SecretStr("k0")]})
    with Publisher("m", settings=s, connection=client) as p:
        p.publish(weights())
    m = store.manifest(1, [b"k1"])
    assert m.key_id == key_id(b"k1")
    with pytest.raises(SignatureError):
        store.manifest(1, [b"other"])


# -- signing turned on over an untrusted head --------------------------------------------

KEY = "publisher-key-0123456789"


@pytest.fixture
def signed(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    s = settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})
    with Publisher("m", settings=s, connection=client) as p:
        yield p


def redis_dump(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {k: client.dump(k) for k in client.keys("*")}


def test_signing_turned_on_publishes_a_signed_version_on_the_unsigned_head(
    pub: Publisher,
    signed: Publisher,
    store: Store,
    settings: HotswapSettings,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub.publish(weights())  # unsigned, as everything was before signing
    unsigned = store.manifest(1)
    # The same weights again: nothing of the untrusted v1 is taken as "unchanged".
    with caplog.at_level("WARNING", logger="hotswap.publisher"):
        v = signed.publish(weights(), message="signing on")
    r = signed.last_report
    assert (v, r.parent, r.created) == (2, 1, True)
    assert (r.tensors_changed, r.tensors_total) == (6, 6)
    assert r.bytes_uploaded == 0  # the blobs are content-addressed and already there
    m = store.manifest(2, [KEY.encode()])  # what an agent with the key accepts
    assert m.key_id == key_id(KEY.encode()) and m.parent == 1
    assert m.lineage == unsigned.lineage  # no false "Redis lost its data" for agents
    assert content_of(m) == content_of(unsigned)
    (entry,) = store.log(1)
    assert entry["untrusted_parent"] == (
        "manifest of m v1 is unsigned, but signing keys are configured"
    )
    assert caplog.messages == [
        "model 'm': published v2 on top of v1 without trusting it (manifest of m v1 is "
        "unsigned, but signing keys are configured): every tensor was hashed, checked and "
        "counted as changed"
    ]
    # From now on the head is trusted: an unchanged publish creates nothing.
    assert signed.publish(weights()) == 2 and signed.last_report.created is False
    assert signed.publish(weights(), force=True) == 3
    assert "untrusted_parent" not in store.log(1)[0]


def test_agent_with_keys_applies_the_first_signed_version(
    pub: Publisher, signed: Publisher, settings: HotswapSettings
) -> None:
    # Keys deployed to agents first: they refuse the unsigned head and keep
    # serving; the publisher turns signing on and its next full publish applies.
    pub.publish(weights(1))
    live = {k: v.clone() for k, v in weights(0).items()}
    keyed = settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})
    with Agent(live, "m", settings=keyed) as agent:
        with pytest.raises(ValidationError, match="is unsigned, but signing keys are configured"):
            agent.wait_for(1, 10)
        assert all(torch.equal(live[k], v) for k, v in weights(0).items())
        v = signed.publish(weights(1))
        assert agent.wait_for(v, 10)
    assert all(torch.equal(live[k], t) for k, t in weights(1).items())


def test_rollback_to_an_unsigned_version_refuses_with_the_publishers_message(
    pub: Publisher, signed: Publisher, client: redis.Redis
) -> None:
    pub.publish(weights(1))  # v1, before signing was turned on
    signed.publish(weights(2))  # v2, signed
    before = redis_dump(client)
    with pytest.raises(SignatureError) as e:
        signed.rollback(to=1)
    assert str(e.value) == (
        "cannot roll back model 'm' to v1: manifest of m v1 is unsigned, but signing keys are "
        "configured; agents with HOTSWAP_SIGNING_KEYS set would refuse it: publish those "
        "weights again to sign them"
    )
    assert redis_dump(client) == before


def content_of(m: Manifest) -> list[tuple[object, ...]]:
    return [(e.name, e.digest, e.dtype, e.shape, e.norm, e.max_abs) for e in m.tensors]


def test_untrusted_head_lends_no_entry(
    signed: Publisher, store: Store, client: redis.Redis
) -> None:
    # A forged head whose entries point at the right blobs but state false norms:
    # reusing them would sign the lie.
    sd = weights()
    signed.publish(sd)
    genuine = store.manifest(1)
    lying = tuple(replace(e, norm=e.norm * 2) for e in genuine.tensors)
    forged = mf.derive(genuine, version=store.reserve_version(), parent=1, tensors=lying)
    client.set(keys.manifest_key("hotswap", "m", 2), mf.encode(forged, b"intruder"))
    client.set(keys.head_key("hotswap", "m"), 2)
    assert signed.publish(sd) == 3
    m = store.manifest(3, [KEY.encode()])
    assert m.parent == 2 and content_of(m) == content_of(genuine)
    assert store.log(1)[0]["untrusted_parent"] == (
        f"manifest of m v2 is signed with unknown key id '{key_id(b'intruder')}'"
    )


@pytest.mark.parametrize(
    ("how", "cause"),
    [
        (
            "garbled",
            "manifest of m v1 is not valid msgpack: ExtraData: unpack(b) received extra data.",
        ),
        ("missing", "its manifest is missing"),
    ],
)
def test_full_publish_repairs_an_unreadable_head(
    pub: Publisher, store: Store, client: redis.Redis, how: str, cause: str
) -> None:
    pub.publish(weights())
    lineage = store.manifest(1).lineage
    if how == "garbled":
        client.set(keys.manifest_key("hotswap", "m", 1), b"\x93garbage")
    else:
        client.delete(keys.manifest_key("hotswap", "m", 1))
    assert pub.publish(weights(1)) == 2
    m = store.manifest(2)
    assert m.parent == 1 and len(m.tensors) == 6
    assert store.log(1)[0]["untrusted_parent"] == cause
    assert m.lineage != lineage  # nothing to take it from: a new one


UNTRUSTED = (
    "model 'm': head v1 cannot be trusted (manifest of m v1 is unsigned, but signing keys "
    "are configured); {}: publish the whole model to put a signed version on top"
)


def test_only_and_rollback_refuse_an_untrusted_head_and_change_nothing(
    pub: Publisher, signed: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights())
    before = redis_dump(client)
    with pytest.raises(SignatureError) as only:
        signed.publish(weights(1), only=["layer.0.*"])
    assert str(only.value) == UNTRUSTED.format("--only inherits the other tensors from it")
    with pytest.raises(SignatureError) as back:
        signed.rollback()
    assert str(back.value) == UNTRUSTED.format("no earlier stored version verifies to roll back to")
    with pytest.raises(SignatureError) as to_head:
        signed.rollback(to=1)
    assert str(to_head.value).startswith("cannot roll back model 'm' to v1: manifest of m v1 is")
    assert redis_dump(client) == before and store.head() == 1


def test_rollback_from_a_forged_head_to_the_newest_version_that_verifies(
    signed: Publisher, store: Store, client: redis.Redis, settings: HotswapSettings
) -> None:
    # The emergency rollback must work when head is the problem: a forged v2
    # (signed with a key nobody accepts) is left behind for the signed v1.
    signed.publish(weights(0))
    genuine = store.manifest(1, [KEY.encode()])
    forged = mf.derive(genuine, version=store.reserve_version(), parent=1, message="forged")
    client.set(keys.manifest_key("hotswap", "m", 2), mf.encode(forged, b"intruder"))
    client.set(keys.head_key("hotswap", "m"), 2)
    live = {k: v.clone() for k, v in weights(0).items()}
    keyed = settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})
    with Agent(live, "m", settings=keyed) as agent:
        # It follows the signed head record (v1), never the plain head.
        assert agent.wait_for(1, 10)
        v = signed.rollback()
        assert agent.wait_for(v, 10)
    r = signed.last_report
    assert (v, r.parent, r.rollback_to, r.kind) == (3, 2, 1, "rollback")
    assert r.tensors_changed == r.tensors_total == 6
    cause = f"manifest of m v2 is signed with unknown key id '{key_id(b'intruder')}'"
    assert r.untrusted_parent == cause
    m = store.manifest(3, [KEY.encode()])
    assert content_of(m) == content_of(genuine) and m.lineage == genuine.lineage
    assert store.log(1)[0]["untrusted_parent"] == cause
    assert all(torch.equal(live[k], t) for k, t in weights(0).items())


def test_rollback_from_a_garbled_head_skips_to_the_version_before(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    pub.publish(weights(0))
    pub.publish(weights(1))
    client.set(keys.manifest_key("hotswap", "m", 2), b"\x93garbage")
    assert pub.rollback() == 3
    assert content_of(store.manifest(3)) == content_of(store.manifest(1))
    assert pub.last_report.untrusted_parent == (
        "manifest of m v2 is not valid msgpack: ExtraData: unpack(b) received extra data."
    )


def test_progress_callback_reports_hash_and_upload_bytes(pub: Publisher) -> None:
    sd = weights()
    sd["big"] = torch.randn(100_000)  # 400 kB: several 64 KiB chunks
    events: list[tuple[str, int, int]] = []
    pub.publish(sd, progress=lambda phase, done, total: events.append((phase, done, total)))
    total = sum(t.nbytes for t in sd.values())
    hashing = [e for e in events if e[0] == "hash"]
    upload = [e for e in events if e[0] == "upload"]
    assert hashing[-1] == ("hash", total, total) and len(hashing) == len(sd)
    assert upload[-1] == ("upload", total, total)
    assert [d for _, d, _ in upload] == sorted(d for _, d, _ in upload)
    verified: list[tuple[str, int, int]] = []
    pub.verify(progress=lambda *e: verified.append(e))
    assert verified[-1] == ("verify", total, total)


def test_verify_catches_corrupted_missing_and_truncated_blobs(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    sd = weights()
    sd["lm_head.weight"] = sd["embed.weight"]
    pub.publish(sd)
    assert pub.verify(1).ok
    m = store.manifest(1).by_name()

    def first_chunk(name: str) -> str:
        e = m[name]
        return keys.blob_key("hotswap", "m", e.digest, e.chunk_bytes, 0)

    raw = client.get(first_chunk("embed.weight"))
    assert raw is not None
    client.set(first_chunk("embed.weight"), bytes([raw[0] ^ 1]) + raw[1:])
    client.delete(first_chunk("layer.0.bias"))
    client.set(first_chunk("layer.1.bias"), b"short")
    report = pub.verify(1)
    assert not report.ok
    assert report.bad == {
        "embed.weight": "digest mismatch: the stored bytes were altered",
        "lm_head.weight": "digest mismatch: the stored bytes were altered",
        "layer.0.bias": "chunk 0 of 1 is missing from Redis (collected or lost); publish again",
        "layer.1.bias": "chunk 0 is 5 bytes, expected 128 (truncated or corrupted)",
    }
    # Publishing the same weights again repairs the store (missing blobs re-uploaded).
    pub.publish(sd)
    assert pub.last_report.created is False and pub.last_report.bytes_uploaded == 128


def test_verify_unknown_version(pub: Publisher) -> None:
    with pytest.raises(NotFound, match=r"^model 'm' has no versions to verify$"):
        pub.verify()
    pub.publish(weights())
    with pytest.raises(NotFound, match=r"^model 'm' has no version 7 \(unknown or collected\)$"):
        pub.verify(7)


def test_bad_inputs_leave_redis_unchanged(
    pub: Publisher, client: redis.Redis, tmp_path: Path
) -> None:
    pub.publish(weights())
    before = {k: client.dump(k) for k in client.keys("*")}
    with pytest.raises(SourceError, match="no such file or directory"):
        pub.publish(tmp_path / "missing.safetensors")
    with pytest.raises(SourceError, match="not a tensor"):
        pub.publish({"a": torch.ones(1), "b": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(SourceError, match=r"has layout torch\.sparse_coo"):
        pub.publish({"s": torch.eye(2).to_sparse()})
    with pytest.raises(SourceError, match=r"--only 'x\.\*' matches no tensor"):
        pub.publish(weights(1), only=["x.*"])
    assert {k: client.dump(k) for k in client.keys("*")} == before


def test_invalid_model_name() -> None:
    with pytest.raises(ConfigError, match=r"^invalid model name 'a b': use 1-128 characters"):
        Publisher("a b", settings=HotswapSettings(_env_file=None))  # type: ignore[call-arg]


def test_redis_unreachable_is_store_unavailable() -> None:
    with EmbeddedRedis() as dead:
        url = dead.url
    s = HotswapSettings(  # type: ignore[call-arg]
        redis_url=url, retry_attempts=2, retry_max_wait=0.05, connect_timeout=0.5, _env_file=None
    )
    with (
        Publisher("m", settings=s) as p,
        pytest.raises(
            StoreUnavailable, match=r"^Redis unreachable while reading head for model 'm' \("
        ),
    ):
        p.publish(weights())


# -- peak memory ------------------------------------------------------------------------

MEMORY_SCRIPT = """
import json, re, sys, threading, psutil, torch
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher

def resident():
    return psutil.Process().memory_info().rss

def high_water():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) * 1024

url, mib, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The streaming path: no delta base kept in memory (its one copy of the
# model is measured by test_publish_delta.py).
s = HotswapSettings(redis_url=url, delta_base=False, _env_file=None)
with Publisher("mem", settings=s) as p:
    # Lazy imports, hashing threads and buffers before the baseline.
    p.publish({"warm": torch.ones(2 * 1024 * 1024)})
    # Tensors of `each` MiB filled in place (no temporary), random so nothing
    # deduplicates; they are resident before the baseline.
    sd = {f"layer.{i}.weight": torch.empty(each * 256 * 1024).normal_() for i in range(mib // each)}
    size = sum(t.nbytes for t in sd.values())
    try:
        # The kernel's high-water mark, reset to the resident size now: the peak
        # of this publish alone, however brief.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        sampler = None
    except OSError:
        # No resettable high-water mark here: sample instead.
        peak, done = [0], threading.Event()
        def sample():
            while not done.wait(0.001):
                peak[0] = max(peak[0], resident())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    base = resident()
    events = []
    p.publish(sd, progress=lambda phase, done, total: events.append((phase, done, total)),
              exclude=["warm"], force=True)  # other names than head's
    if sampler is None:
        top = high_water()
    else:
        done.set()
        sampler.join()
        top = max(peak[0], resident())
    print(json.dumps({"extra": top - base, "size": size, "events": events[-3:],
                      "sampled": sampler is not None,
                      "uploaded": p.last_report.bytes_uploaded, "seconds": p.last_report.seconds}))
"""

# What a publish may hold beyond the tensors it reads: a stats block (4 MiB),
# transport buffers and the hashing threads, whatever the model's size. A copy
# of the 64 MiB tensor (a float64 cast for stats, a serialized copy) is over it.
PUBLISH_OVERHEAD = 32 * 1024 * 1024


def measure_publish(url: str, mib: int, each: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, url, str(mib), str(each)],
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_peak_memory_of_a_publish_has_no_whole_tensor_copy(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    # One 64 MiB tensor: the hardest case for a streaming publish, since any
    # whole-tensor temporary would show as 64-128 MiB more.
    r = measure_publish(server.url, 64, 64)
    assert r["uploaded"] == r["size"] == 64 * 1024 * 1024
    assert r["extra"] < PUBLISH_OVERHEAD, r
    assert r["events"][-1] == ["upload", r["size"], r["size"]]
    client.flushall()


@pytest.mark.slow
def test_one_gigabyte_publish_peak_memory_and_progress(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    r = measure_publish(server.url, 1024, 16)
    assert r["size"] == 1024**3 and r["uploaded"] == r["size"]
    assert r["extra"] < PUBLISH_OVERHEAD, r
    assert r["events"][-1] == ["upload", r["size"], r["size"]]
    client.flushall()


def test_tensors_loaded_one_by_one_never_alias(
    pub: Publisher, store: Store, tmp_path: Path
) -> None:
    # A file source makes a fresh tensor per load: freed memory comes back at the
    # same address for the next tensor of the same shape, which must not be
    # mistaken for a tied tensor.
    sd = {f"t{i:02d}": torch.full((4096,), float(i)) for i in range(20)}
    save_file(sd, str(tmp_path / "same_shapes.safetensors"))
    pub.publish(tmp_path / "same_shapes.safetensors")
    entries = store.manifest(1).by_name()
    assert len({e.digest for e in entries.values()}) == 20
    for name, t in sd.items():
        buf = bytearray(t.nbytes)
        store.blobs.read_into(entries[name], memoryview(buf))
        assert bytes(buf) == t.numpy().tobytes(), name


class LazyWeights(Mapping[str, torch.Tensor]):
    """A mapping that builds a fresh tensor on every lookup, as a lazy loader does."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.full((4096,), float(int(name[1:])))

    def __iter__(self) -> Iterator[str]:
        return iter(f"t{i:02d}" for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def test_lazy_mapping_tensors_never_alias(pub: Publisher, store: Store) -> None:
    # Freed memory comes back at the same address for the next tensor of the
    # same shape; that must not be mistaken for a tied tensor.
    lazy = LazyWeights(20)
    pub.publish(lazy)
    entries = store.manifest(1).by_name()
    assert len({e.digest for e in entries.values()}) == 20
    for name in lazy:
        buf = bytearray(4096 * 4)
        store.blobs.read_into(entries[name], memoryview(buf))
        assert bytes(buf) == lazy[name].numpy().tobytes(), name


# -- pure planning ----------------------------------------------------------------------


def entry(name: str, digest: str = "a" * 64, shape: tuple[int, ...] = (2,)) -> TensorEntry:
    return TensorEntry(name, "F32", shape, 8, digest, 65536, 1.0, 1.0)


def test_select_by_globs() -> None:
    names = ["enc.0.w", "enc.1.w", "dec.0.w"]
    assert plan.select(names, None, "x") == names
    assert plan.select(names, ["enc.*"], "x") == ["enc.0.w", "enc.1.w"]
    assert plan.select(names, ["*.0.*", "dec.*"], "x") == ["enc.0.w", "dec.0.w"]
    with pytest.raises(SourceError, match=r"^x: --only 'nope' matches no tensor$"):
        plan.select(names, ["enc.*", "nope"], "x")
    with pytest.raises(ConfigError, match="--only was given no glob"):
        plan.select(names, [], "x")


def test_diff_and_merge() -> None:
    old = [entry("a"), entry("b"), entry("c")]
    new = [entry("a"), entry("b", "b" * 64), entry("d")]
    d = plan.diff(old, new)
    assert (d.added, d.removed, d.changed, d.unchanged) == (["d"], ["c"], ["b"], ["a"])
    assert d.count == 3
    assert plan.diff(old, [entry("a"), entry("b"), entry("c", shape=(1, 2))]).changed == ["c"]
    merged = plan.merge(old, [entry("b", "b" * 64), entry("z")])
    assert [e.name for e in merged] == ["a", "b", "c", "z"]
    assert merged[1].digest == "b" * 64 and merged[2] == old[2]


def test_unique_blobs_share_equal_content() -> None:
    blobs = plan.unique_blobs([entry("a"), entry("tied"), entry("b", "b" * 64)])
    assert list(blobs) == [f"{'a' * 64}:65536:1", f"{'b' * 64}:65536:1"]
    empty = TensorEntry("e", "F32", (0,), 0, "c" * 64, 65536, 0.0, 0.0)
    assert plan.unique_blobs([empty]) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_manifest_stats_are_codec_stats(pub: Publisher, store: Store, dtype: torch.dtype) -> None:
    # The agent recomputes the norm with codec.norm and allows 1e-6: one function
    # on both sides (here over several of its blocks).
    t = (torch.randn(2 * codec.BLOCK + 17, generator=torch.Generator().manual_seed(1)) * 9).to(
        dtype
    )
    pub.publish({"w": t, "b": torch.ones(3, dtype=dtype)})
    (e, _) = sorted(store.manifest(1).tensors, key=lambda e: e.name, reverse=True)
    assert e.name == "w"
    assert (e.norm, e.max_abs) == (codec.norm(t), codec.stats(t).max_abs)


def stats_of(m: Manifest) -> dict[str, tuple[float, float]]:
    return {e.name: (e.norm, e.max_abs) for e in m.tensors}


def test_stats_of_content_already_in_redis_are_measured_too(pub: Publisher, store: Store) -> None:
    # v3 brings back v1's bytes: nothing is uploaded (the blob is there), and
    # its statistics are still those of the bytes, not the placeholder.
    x, y = torch.randn(5000), torch.randn(5000) * 3
    pub.publish({"w": x})
    pub.publish({"w": y})
    v3 = pub.publish({"w": x.clone()})
    assert pub.last_report.bytes_uploaded == 0
    want = codec.stats(x)
    assert stats_of(store.manifest(v3)) == {"w": (want.norm, want.max_abs)}


def test_stats_follow_the_dtype_of_bytes_shared_by_two_names(pub: Publisher, store: Store) -> None:
    f = torch.randn(4096)
    i = f.view(torch.int32).clone()  # the same bytes, read as integers
    e = torch.empty(0)
    pub.publish({"f": f, "i": i, "e": e})
    m = store.manifest(1)
    assert len({x.digest for x in m.tensors if x.name in ("f", "i")}) == 1
    assert pub.last_report.bytes_uploaded == 4096 * 4  # one blob
    expected = {n: codec.stats(t) for n, t in (("f", f), ("i", i), ("e", e))}
    assert stats_of(m) == {n: (s.norm, s.max_abs) for n, s in expected.items()}
    assert not any(math.isnan(v) for pair in stats_of(m).values() for v in pair)
