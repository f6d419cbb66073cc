"""Least-privilege Redis users: the ACL block of docs/reliability.md, applied for real.

The block is parsed from the document (so the document is what is tested),
loaded into a private redis-server, and a Publisher and an Agent run a whole
workflow under their users. Redis's ACL LOG must stay empty through it: a
command the code needs but the users lack would show there even where the
code swallows the error (an agent's status write is best effort).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import torch
from rel_support import (
    MODEL,
    acl_url,
    admin_store,
    agent_status,
    apply_acl,
    assert_runs_exactly,
    live_copy,
    make_state,
    nudged,
    settings_for,
)

from hotswap import keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError
from hotswap.store import Store
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

NS = "hotswap"


@pytest.fixture
def acl_redis() -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url, socket_timeout=5)
        apply_acl(admin)
        yield server, admin
        admin.close()


def denied_log(admin: redis.Redis) -> list[str]:
    """What Redis refused, as 'user: reason object'."""
    out = []
    for row in admin.execute_command("ACL", "LOG"):
        entry = dict(zip(row[::2], row[1::2], strict=True)) if isinstance(row, list) else row
        get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
        text = {k: v.decode() if isinstance(v, bytes) else v for k, v in get.items()}
        out.append(f"{text['username']}: {text['reason']} {text['object']}")
    return out


def test_publisher_and_agent_run_a_whole_workflow_under_their_users(
    acl_redis: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    server, admin = acl_redis
    as_agent = settings_for(acl_url(server, "hotswap-agent"))
    as_publisher = settings_for(acl_url(server, "hotswap-publisher"), gc_grace_seconds=0)
    first = make_state(1)
    live = live_copy(first)
    with (
        Publisher(MODEL, settings=as_publisher) as pub,
        Agent(live, MODEL, settings=as_agent) as agent,
    ):
        v1 = pub.publish(first, message="first")
        assert agent.wait_for(v1, 10)
        second = nudged(first, 0.01)
        v2 = pub.publish(second, only=["layer00.*"])  # partial: inherits the rest
        assert agent.wait_for(v2, 10)
        v3 = pub.rollback()
        assert agent.wait_for(v3, 10)
        third = nudged(first, 0.02)
        v4 = pub.publish(third)
        assert agent.wait_for(v4, 10)
        assert agent.reporter.flush(logging.getLogger("test"))
        assert pub.running_versions() == [v4]  # read the agents' records and heartbeats
        report = pub.gc(keep=1)
        assert report.deleted_versions == [v1, v2, v3] and report.blobs_deleted > 0
        assert pub.verify().ok
        assert [row["kind"] for row in pub.store.log(10)][:2] == ["gc", "publish"]
    store = admin_store(server)
    assert_runs_exactly(store, live, v4)
    status = agent_status(store, agent.agent_id)
    assert status is not None and (status.version, status.state) == (v4, "stopped")
    assert denied_log(admin) == [], "the workflow needed a command its user lacks"


AGENT_DENIED = [
    ("SET", f"{NS}:{{{MODEL}}}:head", "99"),
    ("SET", f"{NS}:{{{MODEL}}}:manifest:99", "x"),
    ("SET", f"{NS}:{MODEL}:blob:{'0' * 64}:65536:0", "x"),
    ("DEL", f"{NS}:{{{MODEL}}}:head"),
    ("UNLINK", f"{NS}:{MODEL}:blob:{'0' * 64}:65536:0"),
    ("INCRBY", f"{NS}:{{{MODEL}}}:seq", "1"),
    ("XADD", f"{NS}:{{{MODEL}}}:log", "*", "kind", "forged"),
    ("ZADD", f"{NS}:{{{MODEL}}}:blobs", "1", "x"),
    ("PUBLISH", f"{NS}:{{{MODEL}}}:events", "x"),
    ("EVAL", "return 1", "0"),
    ("EVALSHA", "0" * 40, "0"),
    ("SCRIPT", "LOAD", "return 1"),
    ("GET", "elsewhere"),
    ("SET", "elsewhere", "x"),
    ("SET", f"{NS}:{{{MODEL}}}:agentsx", "x"),
    ("SCAN", "0"),
    ("KEYS", "*"),
    ("FLUSHALL",),
    ("CONFIG", "GET", "*"),
    ("ACL", "LIST"),
    ("SUBSCRIBE", "elsewhere"),
    ("PSUBSCRIBE", "*"),
]
PUBLISHER_DENIED = [
    ("HSET", f"{NS}:{{{MODEL}}}:agents", "forged", "x"),
    ("SET", f"{NS}:{{{MODEL}}}:agent:forged", "1"),
    ("DEL", f"{NS}:{{{MODEL}}}:agents"),
    ("GET", "elsewhere"),
    ("SET", "elsewhere", "x"),
    ("EVAL", "return 1", "0"),
    ("SUBSCRIBE", f"{NS}:{{{MODEL}}}:events"),
    ("PUBLISH", "elsewhere", "x"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "SET", "appendonly", "no"),
    ("SCRIPT", "FLUSH"),
    ("ACL", "SETUSER", "hotswap-agent", "+@all"),
    ("SHUTDOWN",),
]


def test_agent_user_cannot_publish_move_head_or_write_blobs(
    acl_redis: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    server, admin = acl_redis
    state = make_state(2)
    with Publisher(MODEL, settings=settings_for(acl_url(server, "hotswap-publisher"))) as pub:
        v1 = pub.publish(state)
    store = admin_store(server)
    before = {k: admin.dump(k) for k in admin.keys("*")}
    agent_client = redis.Redis.from_url(acl_url(server, "hotswap-agent"), socket_timeout=5)
    for command in AGENT_DENIED:
        with pytest.raises(redis.exceptions.NoPermissionError):
            agent_client.execute_command(*command)
    # Through the library too: a one-line ConfigError naming what was refused.
    agent_store = Store(agent_client, MODEL)
    forged = mf.derive(store.manifest(v1), version=2, parent=v1)
    data = mf.encode(forged)
    heard = notice.encode(notice.Notice(MODEL, 2, "publish", forged.lineage))
    with pytest.raises(ConfigError, match=r"^Redis user may not do this while committing v2"):
        agent_store.commit(forged, data, {"version": 2}, heard)
    entry = forged.tensors[0]
    with pytest.raises(ConfigError, match=r"^Redis user may not do this while uploading tensor"):
        agent_store.blobs.upload(entry, memoryview(bytes(entry.nbytes)))
    with pytest.raises(ConfigError, match=r"^Redis user may not do this while reserving a version"):
        agent_store.reserve_version()
    # What an agent needs still works: read head, manifests and blobs, write its status.
    assert agent_store.head() == v1 and agent_store.manifest(v1) == store.manifest(v1)
    out = bytearray(entry.nbytes)
    agent_store.blobs.read_into(entry, memoryview(out), v1)
    assert bytes(out) == bytes(pub_bytes(state, entry.name))
    agent_store.write_agent_status("a-1", b"record", 10.0)
    after = {k: admin.dump(k) for k in admin.keys("*")}
    assert set(after) - set(before) == {
        f"{NS}:{{{MODEL}}}:agents".encode(),
        f"{NS}:{{{MODEL}}}:agent:a-1".encode(),
    }
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else changed
    agent_client.close()


def pub_bytes(state: dict[str, torch.Tensor], name: str) -> bytes:
    from hotswap import codec

    return bytes(codec.as_bytes(state[name]))


def test_publisher_user_cannot_forge_agent_status_or_administer(
    acl_redis: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    server, admin = acl_redis
    client = redis.Redis.from_url(acl_url(server, "hotswap-publisher"), socket_timeout=5)
    for command in PUBLISHER_DENIED:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert admin.ping() and admin.config_get("appendonly") == {"appendonly": "no"}
    client.close()


def test_acl_cannot_fence_hash_fields_or_one_agent_from_another(
    acl_redis: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    """The limits documented beside the ACL: Redis key patterns stop at the key, so any
    agent may overwrite another agent's field of the status hash, or its heartbeat."""
    server, admin = acl_redis
    client = redis.Redis.from_url(acl_url(server, "hotswap-agent"), socket_timeout=5)
    agents = keys.agents_key(NS, MODEL)
    admin.hset(agents, "agent-a", b"honest")
    client.hset(agents, "agent-a", b"overwritten by agent-b")
    client.set(keys.heartbeat_key(NS, MODEL, "agent-a"), b"1", px=1)
    assert admin.hget(agents, "agent-a") == b"overwritten by agent-b"
    client.close()
