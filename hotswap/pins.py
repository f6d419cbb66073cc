"""Rollout pins: the version an agent or a track follows instead of head, while head stays.

``hotswap rollout`` makes a version current for some agents before it is
head: it writes a *pin* for each canary (``agent:<id>``) and for the canary
track (``track:<name>``) into one hash, ``keys.follow_key``. A pin holds the
version and its *base*, the head when the rollout began; it counts only
while head is still that base. So anything that moves head (the rollout's
own promotion, a newer publish, ``hotswap rollback``) ends every pin at once,
with no write to the pins, and an agent never follows a pin against a head
it was not planned against. An agent's own pin wins over its track's.

Agents read head and their two pins in one round trip (``PinIO.read``);
the rollout writes pins and wakes agents in one script (``PinIO.write``),
with a notice that names no version (``notice.encode_look``), so no agent
can be made to apply a version by a notice alone.

Redis holds whatever anyone with write access put there: a pin that does not
parse is ignored (the agent follows head), never an error.

Example:
    >>> decode(encode(Pin(7, 6)))
    Pin(version=7, base=6)
    >>> follows(6, decode(b"7:6"), None), follows(8, decode(b"7:6"), None)
    (7, 8)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from hotswap import keys, notice
from hotswap.connection import RedisClient
from hotswap.subscription import notice_mode

AGENT = "agent:"
TRACK = "track:"
STABLE = "stable"
# Most pins one write sets or clears: a fleet of this many agents moves in
# several scripts, each bounded (a script blocks Redis while it runs).
MAX_PER_WRITE = 1000
# Most pins ``PinIO.all`` reads: more than any fleet, fewer than a flood.
MAX_PINS = 100_000


@dataclass(frozen=True)
class Pin:
    """Follow ``version`` while head is ``base``."""

    version: int
    base: int


def agent_field(agent_id: str) -> str:
    return AGENT + keys.check_name(agent_id, "agent id")


def track_field(track: str) -> str:
    return TRACK + keys.check_name(track, "track")


def encode(pin: Pin) -> bytes:
    return f"{int(pin.version)}:{int(pin.base)}".encode()


def decode(raw: bytes | None) -> Pin | None:
    """The pin ``raw`` holds; None for none, or for anything that is not ``V:B``."""
    if raw is None or len(raw) > 41:
        return None
    parts = bytes(raw).split(b":")
    if len(parts) != 2 or not all(p.isdigit() and 0 < len(p) <= 20 for p in parts):
        return None
    return Pin(int(parts[0]), int(parts[1]))


def holding(head: int | None, own: Pin | None, track: Pin | None) -> Pin | None:
    """The pin that holds: the agent's own, else its track's, while head is its base."""
    return next((p for p in (own, track) if p is not None and p.base == head), None)


def follows(head: int | None, own: Pin | None, track: Pin | None) -> int | None:
    """The version an agent follows: the pin that holds (``holding``), else head."""
    pin = holding(head, own, track)
    return head if pin is None else pin.version


@dataclass(frozen=True)
class Following:
    """What one read found: head, and the pin (if any) that holds."""

    head: int | None
    pin: Pin | None

    @property
    def version(self) -> int | None:
        return self.pin.version if self.pin is not None else self.head


class StoreLike(Protocol):
    client: RedisClient
    model: str
    ns: str

    def call(self, what: str, fn: Any) -> Any: ...

    def _head(self, raw: Any) -> int | None: ...


# KEYS: follow hash. ARGV: channel, notice, how to announce, count of fields
# to delete (-1: the whole hash), those fields, then field/value pairs to
# set. Pins change and agents are woken in one step.
_WRITE = """
local n = tonumber(ARGV[4])
if n < 0 then redis.call('DEL', KEYS[1]); n = 0 end
for i = 5, 4 + n do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = 5 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local shard = ARGV[3] == 'sharded' and redis.pcall('SPUBLISH', ARGV[1], ARGV[2]) or nil
if type(shard) ~= 'number' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
"""


class PinIO:
    """Reads and writes one model's pins (see the module docstring).

    Args:
        store: the model's ``Store`` (its client, retries and head parsing).
    """

    def __init__(self, store: StoreLike) -> None:
        self.store = store
        self.key = keys.follow_key(store.ns, store.model)
        self.head_key = keys.head_key(store.ns, store.model)
        self._write = store.client.register_script(_WRITE)

    def read(self, agent_id: str, track: str = STABLE) -> Following:
        """Head and the pin that holds for this agent, in one round trip."""
        fields = [agent_field(agent_id)]
        if track != STABLE:
            fields.append(track_field(track))

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.get(self.head_key)
            pipe.hmget(self.key, fields)
            return list(pipe.execute(raise_on_error=False))

        raw_head, raw_pins = self.store.call("reading head", read)
        if isinstance(raw_head, Exception):
            raise raw_head
        head = self.store._head(raw_head)
        # A follow key of the wrong type (written by hand) pins nothing.
        found = [] if isinstance(raw_pins, redis.ResponseError) else list(raw_pins)
        own = decode(found[0]) if found else None
        of_track = decode(found[1]) if len(found) > 1 else None
        return Following(head, None if head is None else holding(head, own, of_track))

    def all(self) -> dict[str, Pin]:
        """Every pin that parses, by field (``agent:<id>`` / ``track:<name>``); none if
        the hash is not one, or holds more than ``MAX_PINS`` fields."""

        def read() -> Any:
            # Bounded: a hash grown by hand past MAX_PINS is not read whole.
            if int(self.store.client.hlen(self.key)) > MAX_PINS:
                return {}
            return self.store.client.hgetall(self.key)

        try:
            raw = self.store.call("reading pins", read)
        except redis.ResponseError:
            return {}
        pins = {}
        for field, value in dict(raw).items():
            pin = decode(value)
            name = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            if pin is not None:
                pins[name] = pin
        return pins

    def write(self, set_: dict[str, Pin], clear: Iterable[str] = ()) -> None:
        """Clear the pins ``clear`` names, set ``set_``, and wake every agent to look."""
        self._run(set_, list(clear))

    def clear_all(self) -> None:
        """Remove every pin, whatever the hash holds, and wake agents (they follow head)."""
        self._run({}, None)

    def _run(self, set_: dict[str, Pin], clear: Sequence[str] | None) -> None:
        gone: Sequence[str] = clear or []
        items = list(set_.items())
        # Bounded scripts: each clears and sets at most MAX_PER_WRITE fields.
        first = True
        while first or gone or items:
            first_batch, first = first, False
            batch_clear, gone = gone[:MAX_PER_WRITE], gone[MAX_PER_WRITE:]
            batch_set, items = items[:MAX_PER_WRITE], items[MAX_PER_WRITE:]
            args: list[Any] = [
                keys.events_channel(self.store.ns, self.store.model),
                notice.encode_look(self.store.model),
                notice_mode(self.store.client),
                -1 if clear is None and first_batch else len(batch_clear),
                *batch_clear,
            ]
            for field, pin in batch_set:
                args += [field, encode(pin)]
            self.store.call("writing pins", lambda a=args: self._write(keys=[self.key], args=a))
