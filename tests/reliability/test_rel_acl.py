"""Least-privilege Redis users: the ACL block of docs/reliability.md, applied for real.

The block is parsed from the document (so the document is what is tested),
applied verbatim to a private redis-server, and a Publisher and an Agent run a
whole workflow under their users. Redis's ACL LOG must stay empty through it:
a command the code needs but the users lack would show there even where the
code swallows the error (an agent's status write is best effort). The block
turns the default user off (issue 13, defect 8) and fences each agent's user
to its own status record and heartbeat (defect 7).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import torch
from acl_support import (
    ADMIN,
    PUBLISHER,
    agent_id,
    agent_user,
    apply_documented,
    user_url,
)
from rel_support import (
    MODEL,
    acl_lines,
    agent_status,
    assert_runs_exactly,
    live_copy,
    make_state,
    nudged,
    settings_for,
)

from hotswap import keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError
from hotswap.store import Store
from publisher.publisher import Publisher
from publisher.rollout import Rollout

pytestmark = pytest.mark.reliability

NS = "hotswap"


@pytest.fixture
def acl_redis() -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    """A server with the documented block applied, and a client of its admin user."""
    with EmbeddedRedis() as server:
        admin = apply_documented(server)
        yield server, admin
        admin.close()


def admin_store(server: EmbeddedRedis) -> Store:
    """A Store on the documented admin user, for looking at what the system wrote."""
    client = redis.Redis.from_url(user_url(server, ADMIN), socket_timeout=5)
    return Store(client, MODEL, retrying=operation_retry(5, 0.2))


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
    # HOTSWAP_AGENT_ID names the keys the agent's user may write.
    agent_cfg = settings_for(user_url(server, agent_user()), agent_id=agent_id())
    as_publisher = settings_for(user_url(server, PUBLISHER), gc_grace_seconds=0)
    first = make_state(1)
    live = live_copy(first)
    with (
        Publisher(MODEL, settings=as_publisher) as pub,
        Agent(live, MODEL, settings=agent_cfg) as agent,
    ):
        v1 = pub.publish(first, message="first")
        assert agent.wait_for(v1, 10)
        second = nudged(first, 0.01)
        v2 = pub.publish(second, only=["layer00.*"])  # partial: inherits the rest
        assert agent.wait_for(v2, 10)
        v3 = pub.rollback()
        assert agent.wait_for(v3, 10)
        third = nudged(first, 0.02)
        # A canary rollout: pins, the record and its lease, the look notice, promotion.
        v4 = pub.publish(third, promote=False)
        outcome = Rollout(pub, v4, canary="100%", bake=0.1, tick=0.02).run()
        assert outcome.state == "promoted" and pub.store.head() == v4
        assert agent.wait_for(v4, 10)
        assert agent.reporter.flush(logging.getLogger("test"))
        assert pub.running_versions() == [v4]  # read the agents' records and heartbeats
        report = pub.gc(keep=1)
        assert report.deleted_versions == [v1, v2, v3] and report.blobs_deleted > 0
        assert pub.verify().ok
        kinds = [row["kind"] for row in pub.store.log(10)]
        assert kinds[:3] == ["gc", "rollout promoted", "promote"], kinds
    store = admin_store(server)
    assert_runs_exactly(store, live, v4)
    assert agent.agent_id == agent_id()
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
    ("SET", f"{NS}:{{{MODEL}}}:agents", "x"),  # issue 13, defect 7: broke status and gc
    ("HSET", f"{NS}:{{{MODEL}}}:agents", "web-1", "x"),
    ("SET", f"{NS}:{{{MODEL}}}:status:web-2", "x"),  # another agent's record
    ("SET", f"{NS}:{{{MODEL}}}:agent:web-2", "x"),  # and its heartbeat
    ("DEL", f"{NS}:{{{MODEL}}}:status:web-2"),
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
    ("SET", f"{NS}:{{{MODEL}}}:status:forged", "1"),
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
    with Publisher(MODEL, settings=settings_for(user_url(server, PUBLISHER))) as pub:
        v1 = pub.publish(state)
    store = admin_store(server)
    before = {k: admin.dump(k) for k in admin.keys("*")}
    agent_client = redis.Redis.from_url(user_url(server, agent_user()), socket_timeout=5)
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
    agent_store.write_agent_status(agent_id(), b"record", 10.0)
    with pytest.raises(ConfigError, match=r"^Redis user may not do this while writing agent"):
        agent_store.write_agent_status("web-2", b"record", 10.0)
    after = {k: admin.dump(k) for k in admin.keys("*")}
    assert set(after) - set(before) == {
        keys.agent_status_key(NS, MODEL, agent_id()).encode(),
        keys.heartbeat_key(NS, MODEL, agent_id()).encode(),
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
    client = redis.Redis.from_url(user_url(server, PUBLISHER), socket_timeout=5)
    for command in PUBLISHER_DENIED:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert admin.ping() and admin.config_get("appendonly") == {"appendonly": "no"}
    client.close()


def test_the_default_user_is_off(acl_redis: tuple[EmbeddedRedis, redis.Redis]) -> None:
    """Issue 13, defect 8: after the documented lines the default user was still
    `on nopass ~* &* +@all`, so any client without a password could do anything."""
    server, admin = acl_redis
    stranger = redis.Redis.from_url(server.url, socket_timeout=5)
    for command in (("PING",), ("GET", f"{NS}:{{{MODEL}}}:head"), ("FLUSHALL",)):
        with pytest.raises(redis.AuthenticationError):
            stranger.execute_command(*command)
    stranger.close()
    # Through the library: a one-line ConfigError, not an outage (no retries).
    store = Store(redis.Redis.from_url(server.url, socket_timeout=5), MODEL)
    with pytest.raises(ConfigError, match=r"^Redis refused the credentials while reading head"):
        store.head()
    rules = {r.split()[1]: r for r in map(bytes.decode, admin.execute_command("ACL", "LIST"))}
    assert rules["default"].split()[2] == "off" and "nopass" not in rules["default"]
    assert sorted(rules) == sorted(line.split()[2] for line in acl_lines())


def per_agent_line(agent: str) -> list[str]:
    """The block's agent line made for another agent id, as README says to."""
    (line,) = [line for line in acl_lines() if line.split()[2] == agent_user()]
    return line.replace(agent_id(), agent).split()


def test_each_agent_user_writes_only_its_own_record(
    acl_redis: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    """Per-agent users: a compromised agent credential can neither overwrite another
    agent's record or heartbeat nor break `status` and gc with a key of another type."""
    server, admin = acl_redis
    assert admin.execute_command(*per_agent_line("web-2")) in (b"OK", "OK", True)
    web1 = Store(redis.Redis.from_url(user_url(server, agent_user()), socket_timeout=5), MODEL)
    url2 = user_url(server, agent_user()).replace(agent_id(), "web-2")
    web2 = Store(redis.Redis.from_url(url2, socket_timeout=5), MODEL)
    web1.write_agent_status("web-1", b"one", 30)
    web2.write_agent_status("web-2", b"two", 30)
    for store, other in ((web1, "web-2"), (web2, "web-1")):
        with pytest.raises(ConfigError, match="may not do this while writing agent status"):
            store.write_agent_status(other, b"forged", 30)
        for key in (
            keys.agent_status_key(NS, MODEL, other),
            keys.heartbeat_key(NS, MODEL, other),
            keys.agents_key(NS, MODEL),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                store.client.set(key, b"x")
    assert admin_store(server).agent_records() == [("web-1", b"one", True), ("web-2", b"two", True)]
    web1.client.close()
    web2.client.close()
