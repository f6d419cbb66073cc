"""A rollout's record and its owner lease in Redis (``hotswap rollout`` drives them).

The record says where one model's rollout stands: the version rolled out,
the head it started from (its *base*), the steps, which agents the pins
reach so far, since when the current step bakes, the verdicts, and how it
ended. It is written only by the process that holds the owner lease (one
script checks the lease and writes), so two rollout processes never both
drive one model, and a process killed at any point leaves a record that the
next owner resumes from once the lease has expired. Times are Redis's clock
(``TIME``), so a rollout resumed on another host keeps its bake.

Redis holds whatever anyone with write access put there: a record that does
not decode is reported as such, and its size and lists are bounded.

Example:
    >>> r = Record("r1", "m", 7, 6, steps=["10%", "100%"], bake=60.0, started=1.0)
    >>> decode(encode(r)).version
    7
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from hotswap import keys
from hotswap.errors import FormatError
from hotswap.store import Store

FORMAT = 1
MAX_RECORD_BYTES = 1024 * 1024
# Agents one rollout pins, verdicts and limits it keeps: bounded lists.
MAX_MEMBERS = 10_000
MAX_VERDICTS = 64
STATES = ("running", "promoted", "rolled_back", "superseded", "aborted")
ENDED = frozenset(STATES[1:])


@dataclass(frozen=True)
class Limit:
    """A health number a canary must keep: ``name`` at most (``max``) or at least (``min``)
    ``value``.

    Example:
        >>> Limit.parse("max", "error_rate=0.05").crossed(0.2)
        True
    """

    name: str
    kind: str  # "max" or "min"
    value: float

    @classmethod
    def parse(cls, kind: str, text: str) -> Limit:
        name, sep, value = text.partition("=")
        if not sep or not keys.is_name(name.strip()):
            raise FormatError(f"health limit {text!r}: write NAME=NUMBER, e.g. error_rate=0.05")
        try:
            number = float(value)
        except ValueError:
            raise FormatError(f"health limit {text!r}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise FormatError(f"health limit {text!r}: the bound must be finite")
        return cls(name.strip(), kind, number)

    def crossed(self, number: float) -> bool:
        return number > self.value if self.kind == "max" else number < self.value

    def __str__(self) -> str:
        return f"{self.name} {'<=' if self.kind == 'max' else '>='} {self.value:g}"


@dataclass
class Record:
    """One model's rollout (see the module docstring)."""

    rollout_id: str
    model: str
    version: int
    base: int
    steps: list[str]  # each "N%" (of live agents) or "N" (agents); the last is "100%"
    bake: float
    started: float
    track: str = "canary"
    limits: list[tuple[str, str, float]] = field(default_factory=list)
    failure_limit: int = 0
    apply_timeout: float = 60.0
    state: str = "running"
    step: int = 0
    # Redis time the current step's pins were written (None: not yet).
    step_started: float | None = None
    # Redis time every member of the step ran the version (None: not yet).
    baking_since: float | None = None
    members: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    reason: str | None = None
    owner: str | None = None
    ended: float | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def limit_list(self) -> list[Limit]:
        return [Limit(n, k, v) for n, k, v in self.limits]

    def say(self, verdict: str) -> None:
        """Keep ``verdict``, the newest ``MAX_VERDICTS`` only."""
        self.verdicts = [*self.verdicts, verdict[:300]][-MAX_VERDICTS:]


_TYPES: dict[str, tuple[type, ...]] = {
    "rollout_id": (str,),
    "model": (str,),
    "version": (int,),
    "base": (int,),
    "steps": (list,),
    "bake": (int, float),
    "started": (int, float),
    "track": (str,),
    "limits": (list,),
    "failure_limit": (int,),
    "apply_timeout": (int, float),
    "state": (str,),
    "step": (int,),
    "step_started": (int, float, type(None)),
    "baking_since": (int, float, type(None)),
    "members": (list,),
    "verdicts": (list,),
    "reason": (str, type(None)),
    "owner": (str, type(None)),
    "ended": (int, float, type(None)),
}


def encode(record: Record) -> bytes:
    body = asdict(record)
    body["limits"] = [list(limit) for limit in record.limits]
    return bytes(msgpack.packb({"format": FORMAT, **body}, use_bin_type=True))


def decode(data: bytes) -> Record:
    """Parse a rollout record; FormatError for anything else."""
    if len(data) > MAX_RECORD_BYTES:
        raise FormatError(f"rollout record is {len(data)} bytes, over {MAX_RECORD_BYTES}")
    try:
        raw: Any = msgpack.unpackb(
            data, raw=False, max_array_len=MAX_MEMBERS, max_map_len=64, max_ext_len=0
        )
    except Exception as e:
        raise FormatError(f"rollout record is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise FormatError("rollout record has no known format")
    for name, value in raw.items():
        if name not in _TYPES:
            continue  # a newer writer's field
        if not isinstance(value, _TYPES[name]) or isinstance(value, bool):
            raise FormatError(f"rollout record field {name!r} has a bad value {value!r:.80}")
    try:
        limits = [(str(n), str(k), float(v)) for n, k, v in raw.get("limits", [])]
        record = Record(**{k: v for k, v in raw.items() if k in _TYPES and k != "limits"})
    except (TypeError, ValueError) as e:
        raise FormatError(f"rollout record has the wrong fields: {e}") from None
    record.limits = limits
    strings = [*record.steps, *record.members, *record.verdicts]
    if record.state not in STATES or not all(isinstance(s, str) for s in strings):
        raise FormatError(f"rollout record is garbled (state {record.state!r:.40})")
    return record


# KEYS: lease. ARGV: owner, milliseconds. Take the lease if free or ours.
_TAKE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return {0, redis.call('PTTL', KEYS[1]), held} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, tonumber(ARGV[2]), ARGV[1]}
"""

# KEYS: lease, record. ARGV: owner, milliseconds, record bytes ('' keeps it).
# The record is written only by the lease's owner, who renews it by writing.
_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
return 1
"""

# KEYS: lease. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """Who holds the lease: ``ours``, else the owner's name and milliseconds left."""

    ours: bool
    owner: str
    left_ms: int


class RolloutIO:
    """The rollout record and owner lease of one model (see the module docstring).

    Args:
        store: the model's ``Store`` (its client and retries).
        owner: this process's owner token (default: a new random one).
    """

    def __init__(self, store: Store, owner: str | None = None) -> None:
        self.store = store
        self.owner = owner or f"{secrets.token_hex(4)}"
        self.lease_key = keys.rollout_lease_key(store.ns, store.model)
        self.record_key = keys.rollout_key(store.ns, store.model)
        client = store.client
        self._take = client.register_script(_TAKE)
        self._write = client.register_script(_WRITE)
        self._release = client.register_script(_RELEASE)

    def now(self) -> float:
        """Redis's clock, in seconds: the one every owner of a rollout shares."""
        seconds, micros = self.store.call("reading the clock", self.store.client.time)
        return float(seconds) + float(micros) / 1e6

    def take(self, seconds: float) -> Lease:
        """Take the lease for ``seconds`` if nobody else holds it."""
        ok, left, holder = self.store.call(
            "taking the rollout lease",
            lambda: self._take(keys=[self.lease_key], args=[self.owner, int(seconds * 1000)]),
        )
        owner = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        return Lease(bool(ok), owner, int(left))

    def write(self, seconds: float, record: Record | None = None) -> bool:
        """Renew the lease for ``seconds`` and write ``record`` (if given); False, with
        nothing written, once the lease is no longer ours."""
        data = b"" if record is None else encode(record)
        done = self.store.call(
            "writing the rollout record",
            lambda: self._write(
                keys=[self.lease_key, self.record_key],
                args=[self.owner, int(seconds * 1000), data],
            ),
        )
        return bool(done)

    def release(self) -> None:
        self.store.call(
            "releasing the rollout lease",
            lambda: self._release(keys=[self.lease_key], args=[self.owner]),
        )

    def read(self) -> Record | None:
        """The record (None if there is none); FormatError if it does not decode."""

        def read() -> Any:
            if int(self.store.client.strlen(self.record_key)) > MAX_RECORD_BYTES:
                return b"\0" * (MAX_RECORD_BYTES + 1)
            return self.store.client.get(self.record_key)

        raw = self.store.call("reading the rollout record", read)
        return None if raw is None else decode(bytes(raw))

    def lease(self) -> Lease | None:
        """Who holds the lease now (None: nobody)."""

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.get(self.lease_key)
            pipe.pttl(self.lease_key)
            return list(pipe.execute())

        holder, left = self.store.call("reading the rollout lease", read)
        if holder is None:
            return None
        owner = bytes(holder).decode(errors="replace")
        return Lease(owner == self.owner, owner, max(0, int(left)))
