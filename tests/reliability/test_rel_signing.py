"""Signed manifests against someone who can write to Redis but lacks the key.

The forger uses the raw client, as an intruder would: uploads its own blob,
writes a manifest, moves head and announces it. Agents with
``HOTSWAP_SIGNING_KEYS`` must refuse it before fetching a byte, keep serving
what they run, and follow the next genuine version. Rotation: publishers
move to a new key while agents accept old and new, with no restart.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import psutil
import pytest
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

from hotswap import codec, keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ValidationError
from hotswap.manifest import TensorEntry
from hotswap.store import Store
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

OLD, NEW, ATTACKER = "old-key-0123456789abcdef", "new-key-fedcba9876543210", "intruder-key"
NS = "hotswap"


@pytest.fixture(scope="module")
def private() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def store(private: EmbeddedRedis) -> Iterator[Store]:
    s = admin_store(private)
    s.client.flushall()
    yield s
    s.client.close()


def forge(store: Store, data: bytes, version: int, lineage: str) -> None:
    """What an intruder with write access does: manifest, head, notice, by hand."""
    c = store.client
    c.set(keys.manifest_key(NS, MODEL, version), data)
    c.set(keys.head_key(NS, MODEL), version)
    c.publish(
        keys.events_channel(NS, MODEL),
        notice.encode(notice.Notice(MODEL, version, "publish", lineage)),
    )


def evil_entry(store: Store, like: TensorEntry, values: object) -> TensorEntry:
    """Upload the intruder's tensor and describe it truthfully (digest, norm)."""
    import torch

    assert isinstance(values, torch.Tensor)
    buf = codec.as_bytes(values)
    stats = codec.stats(values)
    entry = TensorEntry(
        like.name, like.dtype, like.shape, like.nbytes, codec.digest(buf), like.chunk_bytes,
        stats.norm, stats.max_abs,
    )  # fmt: skip
    store.blobs.upload(entry, buf)
    return entry


def edited_after_signing(signed: bytes, name: str, entry: TensorEntry) -> bytes:
    """``signed`` with one tensor entry rewritten in its body, signature kept."""
    env = msgpack.unpackb(signed)
    body = msgpack.unpackb(env["body"])
    body["tensors"] = [
        [name, entry.dtype, list(entry.shape), entry.nbytes, entry.digest, entry.chunk_bytes,
         entry.norm, entry.max_abs] if row[0] == name else row
        for row in body["tensors"]
    ]  # fmt: skip
    env["body"] = msgpack.packb(body, use_bin_type=True)
    return bytes(msgpack.packb(env, use_bin_type=True))


REFUSALS = {
    "unsigned": "is unsigned, but signing keys are configured; "
    "publish with HOTSWAP_SIGNING_KEYS set",
    "unknown key": f"is signed with unknown key id '{mf.key_id(ATTACKER.encode())}'; "
    "add that key to HOTSWAP_SIGNING_KEYS",
    "entry edited after signing": f"has a bad signature (key id {mf.key_id(NEW.encode())}): "
    "it was altered after signing",
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_forged_manifest_is_refused_before_a_byte_is_fetched(
    private: EmbeddedRedis, store: Store, how: str
) -> None:
    cfg = settings_for(private, signing_keys=f"{NEW},{OLD}")
    first = make_state(1)
    live = live_copy(make_state(0))
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        fetched = agent.reporter.status.bytes_fetched
        genuine = store.manifest(v1)
        target = genuine.tensors[0]
        evil = evil_entry(store, target, first[target.name] * 1.5)
        v2 = store.reserve_version()  # the intruder takes the next number, as a publisher would
        tampered = mf.derive(
            genuine,
            version=v2,
            parent=v1,
            tensors=tuple(evil if t.name == target.name else t for t in genuine.tensors),
        )
        if how == "unsigned":
            data = mf.encode(tampered)
        elif how == "unknown key":
            data = mf.encode(tampered, ATTACKER.encode())
        else:
            # A genuine signed v2 (as the publisher would have written it), then one
            # tensor entry pointed at the intruder's blob; the signature is kept.
            signed = mf.encode(mf.derive(genuine, version=v2, parent=v1), NEW.encode())
            data = edited_after_signing(signed, target.name, evil)
            assert msgpack.unpackb(data)["sig"] == msgpack.unpackb(signed)["sig"]
        forge(store, data, v2, genuine.lineage)
        with pytest.raises(ValidationError) as caught:
            agent.wait_for(v2, 10)
        (reason,) = caught.value.reasons["<manifest>"]
        assert reason == f"manifest of {MODEL} v{v2} {REFUSALS[how]}"
        # Nothing fetched, nothing changed: still exactly v1.
        assert agent.reporter.status.bytes_fetched == fetched
        assert agent.applied_version == v1 and digests(live) == digests(first)
        assert_runs_exactly(store, live, v1)
        assert eventually(
            lambda: getattr(agent_status(store, agent.agent_id), "rejected_version", None) == v2
        )
        # The operator points head back at v1; the next genuine version applies.
        store.client.set(keys.head_key(NS, MODEL), v1)
        v3 = pub.publish(nudged(first, 0.01))
        assert v3 == v2 + 1 and agent.wait_for(v3, 10)
        assert_runs_exactly(store, live, v3)


def test_key_rotation_without_restarting_agents(
    private: EmbeddedRedis, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_state(1)
    live = live_copy(make_state(0))
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", f"{OLD}, {NEW}")
    agent_cfg = settings_for(private)  # the keys from the environment, as deployed
    assert agent_cfg.key_bytes() == [OLD.encode(), NEW.encode()]
    with Agent(live, MODEL, settings=agent_cfg) as agent:
        with Publisher(MODEL, settings=settings_for(private, signing_keys=OLD)) as before:
            v1 = before.publish(first)
        assert agent.wait_for(v1, 10)
        # Step 2 of the rotation: publishers sign with the new key, still verify the old.
        with Publisher(MODEL, settings=settings_for(private, signing_keys=f"{NEW},{OLD}")) as after:
            v2 = after.publish(nudged(first, 0.01))
            assert agent.wait_for(v2, 10)
            v3 = after.rollback(to=v1)  # a rollback is a new manifest: signed with the new key
            assert agent.wait_for(v3, 10)
        assert_runs_exactly(store, live, v3)
        assert content(store.manifest(v3)) == content(store.manifest(v1))
    kids = {v: store.manifest(v, [OLD.encode(), NEW.encode()]).key_id for v in (v1, v2, v3)}
    assert kids == {
        v1: mf.key_id(OLD.encode()),
        v2: mf.key_id(NEW.encode()),
        v3: mf.key_id(NEW.encode()),
    }
    # Step 3: the old key dropped everywhere; agents that only know the new key
    # follow head (v3, signed with it) and refuse what only the old key signed.
    fresh = live_copy(make_state(0))
    with Agent(fresh, MODEL, settings=settings_for(private, signing_keys=NEW)) as late:
        assert late.wait_for(v3, 10)
        assert_runs_exactly(store, fresh, v3)
        forge(store, store.manifest_bytes(v1), v1, store.manifest(v1).lineage)
        store.client.set(keys.head_key(NS, MODEL), v1)
        assert eventually(lambda: late.last_rejection is not None, 10)
        assert "unknown key id" in str(late.last_rejection)
        assert_runs_exactly(store, fresh, v3)


def test_absurd_declared_sizes_are_refused_before_allocating(
    private: EmbeddedRedis, store: Store
) -> None:
    """A forged manifest within the decode limits (a 64 GiB tensor, a 16 GiB stranger):
    refused by the metadata checks against the live model, nothing allocated."""
    cfg = settings_for(private)
    first = make_state(1, tensors=2)
    live = live_copy(first)
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(first)
        assert agent.wait_for(v1, 10)
        genuine = store.manifest(v1)
        big = TensorEntry("layer00.weight", "F32", (2**17, 2**17), 2**36, "a" * 64, 2**26, 1.0, 1.0)
        stranger = TensorEntry("smuggled", "U8", (2**34,), 2**34, "b" * 64, 2**26, 1.0, 1.0)
        v2 = store.reserve_version()
        forged = mf.derive(
            genuine, version=v2, parent=v1, tensors=(big, genuine.tensors[1], stranger)
        )
        rss = psutil.Process().memory_info().rss
        forge(store, mf.encode(forged), v2, genuine.lineage)
        with pytest.raises(ValidationError) as caught:
            agent.wait_for(v2, 10)
        assert psutil.Process().memory_info().rss - rss < 256 * 1024 * 1024
        reasons = caught.value.reasons
        assert set(reasons) == {"layer00.weight", "smuggled"}
        assert "shape" in " ".join(reasons["layer00.weight"])
        assert "unknown tensor" in " ".join(reasons["smuggled"])
        assert_runs_exactly(store, live, v1)
