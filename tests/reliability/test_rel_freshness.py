"""Freshness: agents converge on head's *content*, and signed heads cannot be replayed.

Issue 13, defects 1 and 2, against the Update Framework's attacks (rollback,
indefinite freeze, mix-and-match) and key revocation. A version number says
nothing about content once Redis was restored from an older snapshot, and a
signature says who wrote a manifest, not how new it is: agents compare the
BLAKE3 digest of manifests, and with signing keys follow only a signed head
record (``hotswap.headrecord``) no older than the newest they accepted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from agent_support import announce, commit_raw, sign_head, until
from rel_support import (
    MODEL,
    admin_store,
    agent_status,
    assert_runs_exactly,
    digests,
    live_copy,
    make_state,
    nudged,
    settings_for,
)

from hotswap import codec, keys
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ValidationError
from hotswap.manifest import Manifest
from hotswap.store import Store
from publisher import views
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

KEY = "freshness-key-0123456789abcdef"
OLD, NEW = "leaked-key-0123456789abcdef", "current-key-fedcba9876543210"
NS = "hotswap"
HEAD = keys.head_key(NS, MODEL)
RECORD = keys.head_record_key(NS, MODEL)
SIGNED = "<signed head>"


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


def record_of(store: Store) -> bytes:
    data = store.head_and_record()[1]
    assert data is not None, "the publisher wrote no signed head record"
    return data


def chunks_of(store: Store, m: Manifest) -> dict[str, bytes]:
    """Every chunk of a version's blobs, as DUMP saves them (what a backup holds)."""
    saved = {}
    for t in m.tensors:
        for key in keys.chunk_keys(NS, MODEL, t.digest, t.chunk_bytes, t.chunks):
            dumped = store.client.dump(key)
            assert isinstance(dumped, bytes)
            saved[key] = dumped
    return saved


def refusal(agent: Agent, version: int) -> dict[str, list[str]]:
    """The reasons the agent refused ``version`` with (it must refuse it)."""
    with pytest.raises(ValidationError) as caught:
        agent.wait_for(version, 10)
    return caught.value.reasons


def test_agent_converges_on_content_after_redis_is_restored_from_an_older_snapshot() -> None:
    """Defect 1: v3 applied, Redis restored to a snapshot at v2, new content published
    as v3 again: the agent applies the new v3 (it used to keep the old one, report
    v3 with lag 0, while a fresh agent ran other bytes as v3)."""
    with EmbeddedRedis() as server:
        cfg = settings_for(server)
        store = admin_store(server)
        base = make_state(1)
        live = live_copy(make_state(0))
        with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
            pub.publish(base)
            assert pub.publish(nudged(base, 0.01)) == 2
            store.client.save()  # the snapshot: head v2
            assert pub.publish(nudged(base, 0.02)) == 3
            assert agent.wait_for(3, 10)
            old_v3 = codec.digest(store.manifest_bytes(3))
            server.restart()  # loads the snapshot: head v2, same lineage
            assert store.head() == 2
            fresh_content = nudged(base, 0.03)
            assert pub.publish(fresh_content) == 3  # v3 again, other bytes
            new_v3 = codec.digest(store.manifest_bytes(3))
            assert new_v3 != old_v3
            assert until(agent, lambda: digests(live) == digests(fresh_content), 15)
            assert_runs_exactly(store, live, 3)
            assert until(agent, lambda: agent.manifest_digest == new_v3)
            assert until(
                agent,
                lambda: (
                    getattr(agent_status(store, agent.agent_id), "manifest_digest", None) == new_v3
                ),
            )
            (row,) = views.status_view(store)["agents"]
            assert (row["version"], row["lag"], row["diverged"]) == (3, 0, False)
            # A freshly started agent runs the same bytes as v3.
            other = live_copy(make_state(0))
            with Agent(other, MODEL, settings=cfg) as late:
                assert late.wait_for(3, 10)
                assert digests(other) == digests(live)
                assert late.manifest_digest == new_v3


def test_signed_agent_after_a_restore_from_an_older_snapshot_waits_for_a_re_signed_head() -> None:
    """With signing keys, Redis restored on purpose from a snapshot at v2 while agents
    run v3: running agents refuse the restored head (issued before v3's) until an
    operator re-signs it (`hotswap resign`), then follow its content; a publish
    on top is applied as usual."""
    with EmbeddedRedis() as server:
        cfg = settings_for(server, signing_keys=KEY)
        store = admin_store(server)
        base = make_state(1)
        live = live_copy(make_state(0))
        with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
            pub.publish(base)
            assert pub.publish(nudged(base, 0.01)) == 2
            store.client.save()
            assert pub.publish(nudged(base, 0.02)) == 3
            assert agent.wait_for(3, 10)
            running = agent.manifest_digest
            server.restart()  # head v2 and its signed record, issued before v3's
            # (wait_for(2) would return at once: v3 runs, newer than v2.)
            assert until(agent, lambda: agent.last_rejection is not None)
            assert agent.last_rejection is not None
            (reason,) = agent.last_rejection.reasons[SIGNED]
            assert reason.startswith(f"model {MODEL!r}: signed head v2 (lineage ")
            assert "a replayed or rolled-back head; if Redis was restored on purpose" in reason
            assert agent.manifest_digest == running and digests(live) == digests(nudged(base, 0.02))
            assert pub.resign().version == 2  # the operator's answer
            announce(store, 2, store.manifest(2).lineage)
            assert until(agent, lambda: digests(live) == digests(nudged(base, 0.01)))
            assert agent.manifest_digest == codec.digest(store.manifest_bytes(2))
            fresh_content = nudged(base, 0.03)
            assert pub.publish(fresh_content) == 3  # v3 again, other bytes
            assert until(agent, lambda: digests(live) == digests(fresh_content))
            assert_runs_exactly(store, live, 3)


# -- rollback (TUF): a signed but older head --------------------------------------------


def test_rollback_a_running_agent_refuses_a_signed_version_replayed_after_a_redis_reset(
    private: EmbeddedRedis, store: Store
) -> None:
    """Defect 2: v1 good, v2 bad, rolled back (v3); Redis reset, a new lineage at v1;
    the saved v2 (manifest, chunks and its signed head) written back, head set to 2
    and announced. The running agent used to switch lineage and apply v2."""
    cfg = settings_for(private, signing_keys=KEY)
    good, bad, later = make_state(1), nudged(make_state(1), 0.5), nudged(make_state(1), 0.01)
    live = live_copy(good)
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(good)
        v2 = pub.publish(bad)
        assert agent.wait_for(v2, 10)
        old = store.manifest(v2)
        saved = (store.manifest_bytes(v2), chunks_of(store, old), record_of(store))
        assert agent.wait_for(pub.rollback(to=v1), 10)
        store.client.flushall()  # Redis reset: every key gone
        assert pub.publish(later) == 1  # a new lineage
        assert until(agent, lambda: digests(live) == digests(later))
        running, before = agent.manifest_digest, digests(live)
        # The attacker's replay of the saved, genuinely signed v2.
        manifest_bytes, chunks, record = saved
        for key, dumped in chunks.items():
            store.client.restore(key, 0, dumped, replace=True)
        store.client.set(keys.manifest_key(NS, MODEL, v2), manifest_bytes)
        store.client.set(RECORD, record)
        store.client.set(HEAD, v2)
        announce(store, v2, old.lineage)
        (reason,) = refusal(agent, v2)[SIGNED]
        assert reason.startswith(f"model {MODEL!r}: signed head v2 (lineage {old.lineage}) was ")
        assert "a replayed or rolled-back head; if Redis was restored on purpose, re-sign" in reason
        assert digests(live) == before and agent.manifest_digest == running
        assert agent.applied_version == 1
        # The rejection is in the status record before waiters wake.
        status = agent_status(store, agent.agent_id)
        assert status is not None and status.rejected_version == v2
        assert status.version == 1 and status.manifest_digest == running


def test_rollback_a_fresh_agent_follows_the_signed_head_not_a_retracted_plain_head(
    private: EmbeddedRedis, store: Store
) -> None:
    """Defect 2: v1 good, v2 bad, ``rollback`` made v3; an attacker sets head to 2.
    A freshly started agent used to apply the retracted v2."""
    cfg = settings_for(private, signing_keys=KEY)
    good, bad = make_state(1), nudged(make_state(1), 0.5)
    with Publisher(MODEL, settings=cfg) as pub:
        v1 = pub.publish(good)
        v2 = pub.publish(bad)
        v3 = pub.rollback(to=v1)
    store.client.set(HEAD, v2)  # the attacker, without the key
    live = live_copy(make_state(0))
    with Agent(live, MODEL, settings=cfg) as agent:
        assert agent.wait_for(v3, 10)
        assert digests(live) == digests(good)
        assert_runs_exactly(store, live, v3)
        # Sent back to the plain head by a notice: it is refused, and said why.
        announce(store, v2, store.manifest(v2).lineage)
        assert until(agent, lambda: agent.last_rejection is not None)
        assert agent.last_rejection is not None
        assert agent.last_rejection.reasons == {
            SIGNED: [
                f"model {MODEL!r}: head v2 is not the signed head (which names v3): moved by "
                "hand, by an intruder, or by a publisher that does not sign head; agents "
                "follow the signed head (roll back with `hotswap rollback`)"
            ]
        }
        assert agent.applied_version == v3 and digests(live) == digests(good)
    assert store.head() == v2  # the agent wrote nothing but its status


def test_rollback_a_fresh_agent_refuses_a_replayed_record_while_the_newer_manifest_is_stored(
    private: EmbeddedRedis, store: Store
) -> None:
    """No watermark yet: a record for v1 replayed while a signed v2 of the same lineage,
    created after it, is still stored is refused (one GET of manifest N+1)."""
    cfg = settings_for(private, signing_keys=KEY)
    with Publisher(MODEL, settings=cfg) as pub:
        v1 = pub.publish(make_state(1))
        replayed = record_of(store)
        pub.publish(nudged(make_state(1), 0.01))
    store.client.set(RECORD, replayed)
    store.client.set(HEAD, v1)
    live = live_copy(make_state(0))
    before = digests(live)
    with Agent(live, MODEL, settings=cfg) as agent:
        (reason,) = refusal(agent, v1)[SIGNED]
        assert reason.startswith(f"model {MODEL!r}: signed head v1 was issued at ")
        assert reason.endswith(
            "a replayed head record; if Redis was restored on purpose, re-sign head "
            "(`hotswap resign`)"
        )
        assert ", but a signed v2 of the same lineage was created after it (" in reason
        assert digests(live) == before and agent.applied_version is None
    assert store.head() == v1 and record_of(store) == replayed


# -- mix-and-match (TUF): a record and a manifest from different moments ------------------


@pytest.mark.parametrize(
    "mix", ["another manifest under the version", "a record of another lineage"]
)
def test_mix_and_match_a_record_names_other_bytes_than_redis_holds(
    private: EmbeddedRedis, store: Store, mix: str
) -> None:
    cfg = settings_for(private, signing_keys=KEY)
    with Publisher(MODEL, settings=cfg) as pub:
        pub.publish(make_state(1))
        v2 = pub.publish(nudged(make_state(1), 0.01))
        genuine = store.manifest(v2)
        if mix == "another manifest under the version":
            # Genuinely signed, of the same version and lineage, from another moment.
            other = mf.derive(genuine, message="another moment", created=genuine.created + 1)
            store.client.set(keys.manifest_key(NS, MODEL, v2), mf.encode(other, KEY.encode()))
        else:
            lineage_a = record_of(store)
            store.client.flushall()
            pub.publish(make_state(2))
            assert pub.publish(nudged(make_state(2), 0.01)) == v2  # lineage B
            store.client.set(RECORD, lineage_a)
    held = store.manifest_bytes(v2)
    live = live_copy(make_state(0))
    before = digests(live)
    with Agent(live, MODEL, settings=cfg) as agent:
        (reason,) = refusal(agent, v2)[SIGNED]
        assert reason.startswith(f"model {MODEL!r}: the signed head names manifest ")
        assert f"but Redis holds {codec.digest(held)[:16]} under v{v2}: metadata mixed" in reason
        assert digests(live) == before and agent.applied_version is None


# -- freeze (TUF): with head_require_expiry ----------------------------------------------


@pytest.mark.parametrize("stale", ["expired", "without expiry"])
def test_freeze_an_agent_requiring_expiry_refuses_a_stale_head_and_follows_a_re_signed_one(
    private: EmbeddedRedis, store: Store, stale: str
) -> None:
    cfg = settings_for(private, signing_keys=KEY, head_require_expiry=True)
    state = make_state(1)
    with Publisher(MODEL, settings=cfg) as pub:
        v1 = pub.publish(state)
    m, data = store.manifest(v1), store.manifest_bytes(v1)
    now = time.time()
    if stale == "expired":
        sign_head(store, m, data, KEY.encode(), issued=now - 120, expires=now - 60)
        expected = f"signed head v1 expired at {now - 60:.3f} (now "
    else:
        sign_head(store, m, data, KEY.encode())
        expected = "signed head v1 carries no expiry, but this agent requires one"
    live = live_copy(make_state(0))
    before = digests(live)
    with Agent(live, MODEL, settings=cfg) as agent:
        (reason,) = refusal(agent, v1)[SIGNED]
        assert reason.startswith(f"model {MODEL!r}: {expected}")
        assert "`hotswap resign`" in reason
        assert digests(live) == before
        # A publisher re-signs head before it expires (`hotswap resign`).
        now = time.time()
        sign_head(store, m, data, KEY.encode(), issued=now, expires=now + 3600)
        announce(store, v1, m.lineage)
        assert until(agent, lambda: agent.applied_version == v1)
        assert_runs_exactly(store, live, v1)


# -- key revocation ----------------------------------------------------------------------


def test_revoked_key_every_version_only_it_signed_is_refused_and_status_names_them(
    private: EmbeddedRedis, store: Store
) -> None:
    """OLD leaked: agents hold NEW only. What only OLD signed is refused, even under a
    valid head, and ``status`` with the agents' keys lists the versions it strands."""
    s1, s2, evil = make_state(1), nudged(make_state(1), 0.01), nudged(make_state(1), 0.5)
    with Publisher(MODEL, settings=settings_for(private, signing_keys=OLD)) as before:
        v1 = before.publish(s1)
    with Publisher(MODEL, settings=settings_for(private, signing_keys=f"{NEW},{OLD}")) as after:
        v2 = after.publish(s2)
    live = live_copy(make_state(0))
    with Agent(live, MODEL, settings=settings_for(private, signing_keys=NEW)) as agent:
        assert agent.wait_for(v2, 10)
        # Whoever holds the leaked key signs a version and its head with it.
        v3 = commit_raw(store, evil, signing_key=OLD.encode())
        (reason,) = refusal(agent, v3)[SIGNED]
        assert reason == (
            f"signed head of model {MODEL!r} is signed with unknown key id "
            f"'{mf.key_id(OLD.encode())}'; add that key to HOTSWAP_SIGNING_KEYS"
        )
        # A head signed with NEW naming v1, which only OLD signed: refused too.
        m1 = store.manifest(v1)
        sign_head(store, m1, store.manifest_bytes(v1), NEW.encode(), issued=time.time())
        store.client.set(HEAD, v1)
        announce(store, v1, m1.lineage)
        # (wait_for(v1) would return at once: v2 runs, newer than v1.)
        assert until(agent, lambda: f"{MODEL} v1 is signed" in str(agent.last_rejection))
        assert agent.last_rejection is not None
        (reason,) = agent.last_rejection.reasons["<manifest>"]
        assert reason == (
            f"manifest of {MODEL} v1 is signed with unknown key id "
            f"'{mf.key_id(OLD.encode())}'; add that key to HOTSWAP_SIGNING_KEYS"
        )
        assert agent.applied_version == v2 and digests(live) == digests(s2)
    signing = views.status_view(store, signing_keys=[NEW.encode()])["signing"]
    assert [row["version"] for row in signing["unverifiable"]] == [v1, v3]
    assert all("unknown key id" in row["reason"] for row in signing["unverifiable"])
    assert signing["head"]["version"] == v1 and signing["head"]["key_id"] == mf.key_id(NEW.encode())
