"""An agent with signing keys follows the signed head record, and refuses it at most once.

Issue 13, defect 2, at the level of the agent's reads (a ``Watch`` counts them):
a refused signed head is not read again, even on a notice, until its bytes
change; a manifest a notice carried is applied only if the signed head names
it (checked before a byte is fetched). The attacks themselves (rollback,
mix-and-match, freeze, revoked keys) are in tests/reliability/test_rel_freshness.py.
"""

from __future__ import annotations

import redis
from agent_support import (
    MODEL,
    announce,
    bump,
    commit_raw,
    equal_state,
    manifest_raw,
    recorded_agent,
    sign_head,
    snapshot,
    status_of,
    until,
)
from pydantic import SecretStr

from hotswap import keys
from hotswap.settings import HotswapSettings
from hotswap.store import Store

KEY = "agent-signed-key-0123456789"


def signed(settings: HotswapSettings) -> HotswapSettings:
    return settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})


def test_a_refused_signed_head_is_not_read_again_until_it_changes(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(signed(settings))
    with agent:
        v1 = commit_raw(store, bump(model.state_dict()), signing_key=KEY.encode())
        assert agent.wait_for(v1, 10)
        v2 = commit_raw(store, bump(model.state_dict()), notify=False, signing_key=KEY.encode())
        # A signed head naming v2 with other bytes than Redis holds (mix-and-match).
        sign_head(store, store.manifest(v2), b"other bytes", KEY.encode())
        before = snapshot(model)
        seen.calls.clear()
        announce(store, v2, store.manifest(v2).lineage)
        assert until(agent, lambda: agent.last_rejection is not None)
        assert seen.calls == [("head", None), ("manifest", v2)]
        # Garbled notices, one at a time: each reads head and record, nothing more.
        channel = keys.events_channel("hotswap", MODEL)
        for i in range(1, 6):
            client.publish(channel, b"\xc1")
            assert seen.wait(lambda i=i: seen.count("head") == 1 + i)  # type: ignore[misc]
        assert until(agent, lambda: agent.state == "idle")
        assert seen.count("manifest") == 1 and seen.count("read") == 0
        assert snapshot(model) == before and agent.applied_version == v1
        record = status_of(store, agent)
        assert record.rejected_version == v2 and record.rejected_count == 1
        assert "metadata mixed from different moments" in record.rejection["<signed head>"][0]
        # A new signed head is read at once: the genuine one naming v2.
        sign_head(store, store.manifest(v2), store.manifest_bytes(v2), KEY.encode())
        announce(store, v2, store.manifest(v2).lineage)
        assert until(agent, lambda: agent.applied_version == v2)


def test_a_carried_manifest_is_applied_only_if_the_signed_head_names_it(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    model, agent, seen = recorded_agent(signed(settings))
    with agent:
        v1 = commit_raw(store, bump(model.state_dict()), signing_key=KEY.encode())
        assert agent.wait_for(v1, 10)
        before = snapshot(model)
        # Validly signed (from another moment) and stored under v2, but no signed
        # head names it: Redis holding the same bytes does not confirm it.
        m, data = manifest_raw(store, bump(model.state_dict()), v1 + 1, signing_key=KEY.encode())
        client.set(keys.manifest_key("hotswap", MODEL, m.version), data)
        seen.calls.clear()
        announce(store, m.version, m.lineage, data)
        assert seen.wait(lambda: seen.count("head") >= 2)  # the carried check, then the look
        assert until(agent, lambda: agent.state == "idle")
        assert seen.count("read") == 0  # not a byte fetched on the notice's word
        assert snapshot(model) == before and agent.applied_version == v1
        assert agent.last_rejection is None
        # The genuine next version, its head signed: applied from the carried manifest.
        new = bump(model.state_dict())
        v2 = commit_raw(store, new, notify=False, signing_key=KEY.encode())
        announce(store, v2, m.lineage, store.manifest_bytes(v2))
        assert agent.wait_for(v2, 10)
        assert equal_state(model, new)
