"""Manifests carried by notices: the agent fetches first, and acts only on what Redis holds.

A notice may carry its version's manifest bytes, so the agent starts on the
blobs without a round trip. Nothing is applied or refused on a notice's word:
the agent compares the carried bytes with the manifest Redis holds first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import torch
from agent_support import (
    MODEL,
    Ten,
    Watch,
    announce,
    bump,
    commit_raw,
    equal_state,
    manifest_raw,
    recorded_agent,
    restate,
    snapshot,
    status_of,
    until,
)
from pydantic import SecretStr

from hotswap import keys, notice
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

KEY = "agent-carried-key-0123456789"


Serving = tuple[Ten, Agent, Watch, int]


@contextmanager
def serving_v1(settings: HotswapSettings, store: Store) -> Iterator[Serving]:
    """A recorded agent, running, that has applied a first version (no carried manifest)."""
    model, agent, seen = recorded_agent(settings)
    with agent:
        # The first look (no head yet) is over before v1 exists, so v1 arrives by its
        # notice alone and no look at head is owed when the test starts counting.
        assert until(agent, lambda: agent.head_seen and agent.state == "idle")
        v1 = commit_raw(store, bump(model.state_dict()))
        assert agent.wait_for(v1, 10)
        yield model, agent, seen, v1


def test_publisher_notice_carries_the_manifest_and_agent_fetches_before_reading_it(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(settings)
    heard = client.pubsub(ignore_subscribe_messages=True)
    heard.subscribe(keys.events_channel("hotswap", MODEL))
    with agent, Publisher(MODEL, settings=settings, connection=client) as pub:
        assert until(agent, lambda: agent.state == "idle")
        seen.calls.clear()
        new = bump(model.state_dict())
        v = pub.publish(new)
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)
        # The blobs first, then one read of the manifest to confirm, nothing else.
        reads = [c for c in seen.calls if c[0] == "read"]
        assert reads and seen.calls == [*reads, ("manifest", v)]
        assert set(reads) == {("read", v)}
    said = None
    for _ in range(50):  # None for the subscribe confirmation: ask again
        said = heard.get_message(timeout=0.1)
        if said is not None:
            break
    heard.close()
    assert said is not None
    assert notice.decode(said["data"]).manifest == store.manifest_bytes(v)


def test_carried_manifest_redis_does_not_hold_changes_nothing(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    with serving_v1(settings, store) as (model, agent, seen, v1):
        before, fetched = snapshot(model), agent.reporter.status.bytes_fetched
        # Uploaded and announced, never committed (a forged notice, or a
        # publish that lost its compare-and-set).
        m, data = manifest_raw(store, bump(model.state_dict()), v1 + 1)
        seen.calls.clear()
        announce(store, v1 + 1, m.lineage, data)
        # Done once head's manifest (v1, which runs) was read.
        assert seen.wait(lambda: seen.calls[-1:] == [("manifest", v1)])
        assert until(agent, lambda: agent.state == "idle")
        # Fetched, found no such manifest to confirm, looked for it and at head.
        confirm = seen.calls.index(("manifest", v1 + 1))
        assert set(seen.calls[:confirm]) == {("read", v1 + 1)}
        assert seen.calls[confirm:] == [
            ("manifest", v1 + 1),
            ("manifest", v1 + 1),
            ("head", None),
            ("manifest", v1),
        ]
        assert snapshot(model) == before and agent.applied_version == v1
        assert agent.last_rejection is None
        assert agent.reporter.status.bytes_fetched > fetched
        # Not a lie about what Redis holds: later notices still carry the way.
        with Publisher(MODEL, settings=settings, connection=client) as pub:
            seen.calls.clear()
            new = bump(model.state_dict())
            v = pub.publish(new)
            assert agent.wait_for(v, 10)
            assert seen.calls[0] == ("read", v) and seen.calls[-1] == ("manifest", v)


def test_carried_manifest_unlike_redis_is_not_applied_and_no_longer_trusted(
    settings: HotswapSettings,
    client: redis.Redis,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with serving_v1(settings, store) as (model, agent, seen, _v1):
        real = bump(model.state_dict(), 0.5)
        v2 = commit_raw(store, real, notify=False)
        forged, data = manifest_raw(store, bump(model.state_dict(), -0.5), v2)
        seen.calls.clear()
        with caplog.at_level(logging.WARNING, logger="hotswap.agent"):
            announce(store, v2, forged.lineage, data)
            assert agent.wait_for(v2, 10)
        # Redis's v2 runs, not the notice's.
        assert equal_state(model, real)
        assert agent.last_rejection is None
        assert (
            f"model {MODEL!r}: the notice for v{v2} carried a manifest that is not the one "
            "Redis holds (a forged notice?); reading manifests from Redis from now on"
        ) in caplog.messages
        first_confirm = seen.calls.index(("manifest", v2))
        assert seen.calls[:first_confirm] and set(seen.calls[:first_confirm]) == {("read", v2)}
        # From now on the manifest is read before any blob.
        with Publisher(MODEL, settings=settings, connection=client) as pub:
            seen.calls.clear()
            new = bump(model.state_dict())
            v = pub.publish(new)
            assert agent.wait_for(v, 10)
            assert seen.calls[0] == ("manifest", v)
            assert equal_state(model, new)


def test_carried_manifest_that_fails_validation_records_no_rejection(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    with serving_v1(settings, store) as (model, agent, seen, v1):
        before = snapshot(model)
        bad = bump(model.state_dict())
        name = next(iter(bad))
        m, data = manifest_raw(
            store, bad, v1 + 1, tamper=lambda es: restate(es, name, norm=math.pi * 1e3)
        )
        seen.calls.clear()
        announce(store, v1 + 1, m.lineage, data)
        assert seen.wait(lambda: ("head", None) in seen.calls)
        assert until(agent, lambda: agent.state == "idle")
        assert ("read", v1 + 1) in seen.calls  # fetched and validated, then not confirmed
        assert snapshot(model) == before and agent.last_rejection is None
        status = status_of(store, agent)
        assert status.rejected_version is None and status.rejected_count == 0
        # The real v2 (same number) is not held against what the notice said.
        good = bump(model.state_dict())
        v2 = commit_raw(store, good)
        assert v2 == v1 + 1
        assert agent.wait_for(v2, 10)
        assert equal_state(model, good)


def test_signed_agent_reads_redis_when_the_carried_manifest_is_unsigned(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    signed = settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})
    model, agent, seen = recorded_agent(signed)
    with agent:
        v1 = commit_raw(store, bump(model.state_dict()), signing_key=KEY.encode())
        assert agent.wait_for(v1, 10)
        real = bump(model.state_dict())
        v2 = commit_raw(store, real, notify=False, signing_key=KEY.encode())
        unsigned, data = manifest_raw(store, real, v2)
        seen.calls.clear()
        announce(store, v2, unsigned.lineage, data)
        assert agent.wait_for(v2, 10)
        # The carried bytes did not verify: nothing was fetched before the signed
        # head (read with head) and the manifest it names.
        assert seen.calls[:2] == [("head", None), ("manifest", v2)]
        assert equal_state(model, real)
        assert torch.equal(model.state_dict()[next(iter(real))], next(iter(real.values())))


def test_norms_a_carried_manifest_states_are_not_learned_before_it_is_confirmed(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(settings)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        running = {k: v.clone() for k, v in model.state_dict().items()}
        name = next(iter(running))
        # Every entry is what runs, but one states a norm far below the truth:
        # learned, it would make any real change of that tensor look 1e6x larger.
        m, data = manifest_raw(store, running, 1, tamper=lambda es: restate(es, name, norm=1e-6))
        announce(store, 1, m.lineage, data)
        assert seen.wait(lambda: ("head", None) in seen.calls)
        changed = dict(running)
        changed[name] = running[name] * 1.01
        v1 = commit_raw(store, changed)
        assert agent.wait_for(v1, 10)
        assert equal_state(model, changed) and agent.last_rejection is None


def test_a_notice_for_the_version_that_runs_is_dropped_only_if_it_carries_that_manifest(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    """One number can name two manifests (Redis restored from an older snapshot):
    a notice naming the version that runs is dropped unread only when the manifest
    it carries is the one that runs; otherwise head decides."""
    with serving_v1(settings, store) as (_model, agent, seen, v1):
        lineage = store.manifest(v1).lineage
        seen.calls.clear()
        announce(store, v1, lineage, store.manifest_bytes(v1))  # the very manifest: nothing
        announce(store, v1, lineage)  # no manifest carried: a look at head
        assert seen.wait(lambda: seen.calls[-1:] == [("manifest", v1)])
        assert until(agent, lambda: agent.state == "idle")
        assert seen.calls == [("head", None), ("manifest", v1)]
        assert agent.applied_version == v1 and agent.last_rejection is None
