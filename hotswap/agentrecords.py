"""Redis I/O of agents' status records and heartbeats (``Store.records``).

Each agent writes two keys of its own, its record and its heartbeat, so a
Redis user can be fenced to one agent (README, Security). Readers trust no
agent: a key of the wrong type, an oversized record or more records than
``MAX_AGENT_RECORDS`` is reported, and the rest still read. Records written
by older agents into the shared hash are read too (rolling upgrades).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.event import AfterSlotsCacheRefreshEvent

from hotswap import keys
from hotswap.connection import RedisClient
from hotswap.status import MAX_STATUS_BYTES

# How long an agent's record outlives its heartbeat: `hotswap status` shows a
# dead agent as expired for a day, then it is gone (agent ids are new at each
# start unless fixed, so records must not pile up).
AGENT_RECORD_LINGER = 24 * 3600
# Most agent records `status` and gc read: a hostile user could write millions.
MAX_AGENT_RECORDS = 10_000


class AgentRecordIO:
    """Agents' records of one model: write, remove, read them all.

    Args:
        client: the Redis client.
        model: the model's name.
        ns: the namespace.
        call: the store's guarded call (retries and error mapping).
    """

    def __init__(
        self,
        client: RedisClient,
        model: str,
        ns: str,
        call: Callable[[str, Callable[[], Any]], Any],
    ) -> None:
        self.client, self.model, self.ns = client, model, ns
        self.call = call

    def _key(self, fn: Callable[..., str], *args: Any) -> str:
        return fn(self.ns, self.model, *args)

    def write(self, agent_id: str, record: bytes, ttl: float) -> None:
        """Write one agent's status record and heartbeat (its two keys, nothing shared).

        Each agent has keys of its own (``keys.agent_status_key``,
        ``keys.heartbeat_key``), so a Redis user can be fenced to one agent's
        keys (README, Security). The heartbeat lives ``ttl`` seconds; the
        record ``AGENT_RECORD_LINGER`` longer, so a dead agent shows as gone.
        """
        status = self._key(keys.agent_status_key, agent_id)
        beat = self._key(keys.heartbeat_key, agent_id)
        ttl_ms = max(1, int(ttl * 1000))

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(status, record, px=ttl_ms + AGENT_RECORD_LINGER * 1000)
            pipe.set(beat, b"1", px=ttl_ms)
            pipe.execute()

        self.call("writing agent status", write)

    def watch_topology(self, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed()`` whenever a cluster client learns the slot map again
        (a failover or resharding was met); returns the call that stops it.

        ``changed`` runs on whichever thread refreshed the map, inside redis-py:
        it must only take note. Nothing happens on one server.

        Example::

            stop = store.records.watch_topology(wake.set)
            ...
            stop()
        """
        # The cluster client's event dispatcher has no public accessor; the
        # ClusterPubSub of redis-py listens on the same one for the same event.
        dispatcher = getattr(getattr(self.client, "nodes_manager", None), "_event_dispatcher", None)
        if dispatcher is None:
            return _nothing
        listening = {AfterSlotsCacheRefreshEvent: [_Listener(changed)]}
        dispatcher.register_listeners(listening)
        return lambda: dispatcher.unregister_listeners(listening)

    def remove(self, agent_id: str) -> None:
        """Delete an agent's record and heartbeat, and its field of the older agents' hash."""
        status = self._key(keys.agent_status_key, agent_id)
        beat = self._key(keys.heartbeat_key, agent_id)
        agents = self._key(keys.agents_key)

        def remove() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(status, beat)
            pipe.hdel(agents, agent_id)
            _replies(pipe.execute(raise_on_error=False))  # a hash of the wrong type: no field

        self.call("removing agent status", remove)

    def all(self) -> list[tuple[str, bytes, bool]]:
        """(agent id, status bytes, heartbeat alive) for every agent that reported.

        The bytes are empty where the record could not be read
        (``report`` says why).
        """
        return [(r.agent_id, r.data or b"", r.alive) for r in self.report().records]

    def report(self) -> AgentRecords:
        """Every agent's status record as stored, and what could not be read.

        Agents' Redis users are not trusted here: a key of the wrong type, a
        record over ``MAX_STATUS_BYTES`` (its size is asked first), a field
        name that is no agent id, more records than ``MAX_AGENT_RECORDS``: each
        is reported, and the rest still read. Records are read from each
        agent's key and from the hash older agents wrote; an agent in both is
        read from its key.

        Raises:
            StoreUnavailable: Redis could not be reached.
            ConfigError: this Redis user may not read the records.
        """
        records: AgentRecords = self.call("reading agent status", self._read_agents)
        return records

    def _read_agents(self) -> AgentRecords:
        problems: list[str] = []
        found: list[bytes] = []  # as stored: a key need not be UTF-8
        for key in self.client.scan_iter(match=self._key(keys.agent_status_pattern), count=1000):
            if len(found) == MAX_AGENT_RECORDS:
                problems.append(f"more than {MAX_AGENT_RECORDS} agent records: the rest unread")
                break
            found.append(key if isinstance(key, bytes) else key.encode())
        agents = self._key(keys.agents_key)
        pipe = self.client.pipeline(transaction=False)
        for key in found:
            pipe.strlen(key)
        pipe.hkeys(agents)
        *sizes, fields = _replies(pipe.execute(raise_on_error=False))
        if _wrong_type(fields):
            problems.append(
                f"{agents} is not a hash (WRONGTYPE): the records older agents wrote there "
                "cannot be read; an admin may DEL it (agents of this version do not write it)"
            )
            fields = []
        own = {
            keys.agent_of_status_key(k.decode(errors="backslashreplace")): (k, n)
            for k, n in zip(found, sizes, strict=True)
        }
        if len(fields) > MAX_AGENT_RECORDS:
            problems.append(
                f"{agents} holds more than {MAX_AGENT_RECORDS} records: the rest unread"
            )
        legacy = {
            name: f
            for f in sorted(fields)[:MAX_AGENT_RECORDS]
            if (name := f.decode(errors="backslashreplace")) not in own
        }
        readable = [k for k, n in own.values() if type(n) is int and 0 < n <= MAX_STATUS_BYTES]
        named = [i for i in (*own, *legacy) if keys.is_name(i)]
        pipe = self.client.pipeline(transaction=False)
        for key in readable:
            pipe.get(key)
        for agent_id in named:
            pipe.exists(self._key(keys.heartbeat_key, agent_id))
        for field in legacy.values():
            pipe.hstrlen(agents, field)
        replies = _replies(pipe.execute(raise_on_error=False))
        values = dict(zip(readable, replies[: len(readable)], strict=True))
        alive = dict(zip(named, replies[len(readable) : len(readable) + len(named)], strict=True))
        hsizes = replies[len(readable) + len(named) :]
        small = [f for f, n in zip(legacy.values(), hsizes, strict=True) if n <= MAX_STATUS_BYTES]
        hvalues = dict(zip(small, self.client.hmget(agents, small), strict=True)) if small else {}
        records = [
            _record(agent_id, values.get(key), size, bool(alive.get(agent_id)), "status key")
            for agent_id, (key, size) in own.items()
        ]
        records += [
            _record(agent_id, hvalues.get(field), size, bool(alive.get(agent_id)), "hash field")
            for (agent_id, field), size in zip(legacy.items(), hsizes, strict=True)
        ]
        kept = [r for r in records if r is not None]
        return AgentRecords(sorted(kept, key=lambda r: r.agent_id), problems)


class _Listener:
    """redis-py's event listener interface around one callback.

    A bound method is held weakly: a reporter never closed must not live as
    long as the client it wrote through.
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed: Callable[[], Callable[[], None] | None] = (
            weakref.WeakMethod(changed) if inspect.ismethod(changed) else lambda: changed
        )

    def listen(self, event: object) -> None:
        changed = self.changed()
        if changed is not None:
            changed()


def _nothing() -> None:
    return None


# -- agent records: what was read, pure -----------------------------------------------


@dataclass(frozen=True)
class AgentRecord:
    """One agent's status record as stored (bytes, not decoded) and its heartbeat.

    ``data`` is None where the record could not be read; ``problem`` says why.
    """

    agent_id: str
    data: bytes | None
    alive: bool
    problem: str | None = None


@dataclass(frozen=True)
class AgentRecords:
    """Every agent's record (by id), and what could not be read at all."""

    records: list[AgentRecord]
    problems: list[str]


def _wrong_type(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")


def _replies(replies: list[Any]) -> list[Any]:
    """Pipeline replies, raising any error but WRONGTYPE (a record's key of another type)."""
    for reply in replies:
        if isinstance(reply, Exception) and not _wrong_type(reply):
            raise reply
    return replies


def _record(agent_id: str, value: Any, size: Any, alive: bool, where: str) -> AgentRecord | None:
    """The record read for ``agent_id`` (size asked first), None if it expired meanwhile."""
    if _wrong_type(size) or _wrong_type(value):
        return AgentRecord(agent_id, None, alive, f"its {where} is not a string (WRONGTYPE)")
    if type(size) is int and size > MAX_STATUS_BYTES:
        problem = f"its record is {size} bytes, over the {MAX_STATUS_BYTES}-byte limit"
        return AgentRecord(agent_id, None, alive, problem)
    if value is None:
        return None
    return AgentRecord(agent_id, bytes(value), alive)
