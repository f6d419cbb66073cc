"""Agent status records in keys of their own (issue 13, defect 7), read by a Store.

Each agent writes ``NS:{MODEL}:status:ID`` (its record) and ``NS:{MODEL}:agent:ID``
(its heartbeat), so a Redis user can be fenced to one agent's keys. Records in
the hash older agents wrote are still read (a rolling upgrade shows both), and
nothing an agent's user can write makes the reader fail.
"""

from __future__ import annotations

import pytest
import redis
from polling import until

from hotswap import agentrecords as store_module
from hotswap import keys
from hotswap import status as st
from hotswap.settings import HotswapSettings
from hotswap.store import AgentRecord, Store
from publisher import views

NS = "hotswap"


def test_keys_of_one_agent() -> None:
    assert keys.agent_status_key("ns", "m", "web-1") == "ns:{m}:status:web-1"
    assert keys.agent_status_pattern("ns", "m") == "ns:{m}:status:*"
    assert keys.agent_of_status_key("ns:{m}:status:web-1") == "web-1"
    with pytest.raises(Exception, match="invalid agent id 'a b'"):
        keys.agent_status_key("ns", "m", "a b")


def test_an_agent_writes_only_its_own_keys(store: Store, client: redis.Redis) -> None:
    store.write_agent_status("web-1", b"record", ttl=30)
    assert sorted(client.keys("*")) == [
        keys.heartbeat_key(NS, "m", "web-1").encode(),
        keys.agent_status_key(NS, "m", "web-1").encode(),
    ]
    status_ttl = client.pttl(keys.agent_status_key(NS, "m", "web-1"))
    beat_ttl = client.pttl(keys.heartbeat_key(NS, "m", "web-1"))
    # The record outlives the heartbeat, so a dead agent is shown as gone for a while.
    assert 0 < beat_ttl <= 30_000 < status_ttl <= 30_000 + store_module.AGENT_RECORD_LINGER * 1000
    assert store.agent_report().records == [AgentRecord("web-1", b"record", True)]
    store.remove_agent("web-1")
    assert client.keys("*") == []


def test_older_agents_in_the_hash_are_still_read(store: Store, client: redis.Redis) -> None:
    """A rolling upgrade: an older agent wrote a field of the hash and its heartbeat."""
    client.hset(keys.agents_key(NS, "m"), mapping={"old-1": b"old record", "both": b"stale"})
    client.set(keys.heartbeat_key(NS, "m", "old-1"), b"1", px=60_000)
    store.write_agent_status("new-1", b"new record", ttl=30)
    store.write_agent_status("both", b"fresh", ttl=30)  # upgraded in place, same fixed id
    assert store.agent_records() == [
        ("both", b"fresh", True),
        ("new-1", b"new record", True),
        ("old-1", b"old record", True),
    ]
    store.remove_agent("old-1")
    assert [r[0] for r in store.agent_records()] == ["both", "new-1"]


def test_keys_of_the_wrong_type_are_reported_not_fatal(store: Store, client: redis.Redis) -> None:
    """`SET NS:{m}:agents x` made every reader fail with WRONGTYPE (exit 3)."""
    store.write_agent_status("ok", b"fine", ttl=30)
    client.set(keys.agents_key(NS, "m"), b"x")
    client.hset(keys.agent_status_key(NS, "m", "hashed"), "a", "b")
    client.set(keys.heartbeat_key(NS, "m", "hashed"), b"1")
    client.set(keys.agent_status_key(NS, "m", "huge"), b"z" * (st.MAX_STATUS_BYTES + 1))
    report = store.agent_report()
    assert report.records == [
        AgentRecord("hashed", None, True, "its status key is not a string (WRONGTYPE)"),
        AgentRecord("huge", None, False, "its record is 262145 bytes, over the 262144-byte limit"),
        AgentRecord("ok", b"fine", True),
    ]
    assert report.problems == [
        "hotswap:{m}:agents is not a hash (WRONGTYPE): the records older agents wrote there "
        "cannot be read; an admin may DEL it (agents of this version do not write it)"
    ]
    store.remove_agent("ok")  # the hash of the wrong type does not stop it
    assert [r.agent_id for r in store.agent_report().records] == ["hashed", "huge"]


def test_status_shows_unreadable_records_by_their_keys_id(
    store: Store, client: redis.Redis
) -> None:
    # A record claiming another id is shown under its key's id: under a per-agent
    # ACL user only that agent could have written the key.
    store.write_agent_status("web-1", st.encode(st.AgentStatus("web-2", "h", 1)), ttl=30)
    client.rpush(keys.agent_status_key(NS, "m", "listed"), b"x")
    rows = {s.agent_id: s for s, _ in views.agent_statuses(store)}
    assert rows["web-1"].host == "h"
    assert rows["listed"].state == "unreadable"
    assert rows["listed"].last_error == "its status key is not a string (WRONGTYPE)"


def test_records_read_are_capped(
    store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_AGENT_RECORDS", 3)
    for i in range(5):
        store.write_agent_status(f"a{i}", b"r", ttl=30)
    report = store.agent_report()
    assert len(report.records) == 3
    assert report.problems == ["more than 3 agent records: the rest unread"]


def test_a_fixed_agent_id_names_its_keys(
    settings: HotswapSettings, store: Store, client: redis.Redis
) -> None:
    import torch

    from hotswap.agent import Agent

    fixed = settings.model_copy(update={"agent_id": "web-1"})
    with Agent({"w": torch.zeros(2)}, "m", settings=fixed) as agent:
        assert agent.agent_id == "web-1"
        assert until(lambda: client.exists(keys.agent_status_key(NS, "m", "web-1")) == 1, 500)
    assert [r.agent_id for r in store.agent_report().records] == ["web-1"]
