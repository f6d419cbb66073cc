"""The status record each agent writes for ``hotswap status`` (msgpack).

Fields unknown to a reader are ignored and missing ones take their defaults,
so agents and the CLI of different releases read each other's records during
a rolling upgrade.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from hotswap.errors import FormatError
from hotswap.keys import is_name

MAX_STATUS_BYTES = 256 * 1024
# msgpack allocates every slot an array header declares before reading any
# (and arrays nest 1024 deep), so arrays get a small limit: the reporter
# keeps at most 5 reasons per tensor and 50 tensors (hotswap/reporter.py).
# Maps are filled as read; their limit only refuses junk early.
MAX_LIST = 64
MAX_MAP = 1024
# Versions an agent remembers having rejected (``rejected_versions``): enough
# for ``hotswap rollback`` to pass over a run of bad versions.
RECENT_REJECTIONS = 16
# Health numbers a record carries (``Agent(health=...)``), and how long a name.
MAX_HEALTH = 32
MAX_HEALTH_NAME = 64
# Kept of the last probe failure's reason (``last_probe``).
MAX_PROBE_REASON = 300
# The largest process group a record may name (rank and world size).
MAX_WORLD = 1 << 20
STATES = ("starting", "idle", "fetching", "applying", "pending", "disconnected", "stopped")


@dataclass
class AgentStatus:
    """What one agent reports: who it is, what it runs, what it last refused."""

    agent_id: str
    host: str
    pid: int
    state: str = "starting"
    version: int | None = None
    lineage: str | None = None
    # BLAKE3 of the wire bytes of the manifest that runs (None from agents
    # older than this field, or before the first version): ``hotswap status``
    # shows an agent whose digest is not its version's as diverged.
    manifest_digest: str | None = None
    last_error: str | None = None
    rejected_version: int | None = None
    rejection: dict[str, list[str]] = field(default_factory=dict)
    # Tensors the last rejection named in all (``rejection`` keeps at most 50);
    # None from agents older than this field.
    rejected_tensors: int | None = None
    # The versions this agent rejected lately, oldest first (at most
    # ``RECENT_REJECTIONS``; None from agents older than this field, which
    # report the last only): ``hotswap rollback`` passes over all of them.
    rejected_versions: list[int] | None = None
    fetch_seconds: float = 0.0
    validate_seconds: float = 0.0
    apply_seconds: float = 0.0
    bytes_fetched: int = 0
    # Bytes fetched for the version applied last (a delta's frames, not its
    # tensors' size); None from agents older than this field.
    last_fetched: int | None = None
    applied_count: int = 0
    rejected_count: int = 0
    updated: float = 0.0
    # The delta encodings the agent decodes, by wire name (None from agents
    # older than deltas, which read full blobs only): a fleet is upgraded
    # before a publisher writes deltas (``hotswap status`` shows them).
    encodings: list[str] | None = None
    # The track the agent follows (``HOTSWAP_TRACK``; None from agents older
    # than tracks, which follow head like "stable").
    track: str | None = None
    # The numbers ``Agent(health=...)`` returned last (at most ``MAX_HEALTH``,
    # finite), and when (wall clock) that call was made; health None with a
    # time: the callback raised or returned no mapping then. None, None: no
    # callback (or an older agent).
    health: dict[str, float] | None = None
    health_at: float | None = None
    # Versions a post-apply probe or a probation failure refused, and the last
    # such failure's reason (cut to ``MAX_PROBE_REASON``).
    probe_failures: int = 0
    last_probe: str | None = None
    # The version a rollout pinned this agent to (None: it follows its track).
    pinned: int | None = None
    # The process group this agent applies with (``apply_pending(group=...)``):
    # its name (rank 0's agent id), this agent's rank and the group's size;
    # None until its first group apply (or from older agents).
    group: str | None = None
    rank: int | None = None
    world: int | None = None


_FIELDS = set(AgentStatus.__dataclass_fields__)
_INT, _NUM, _STR = (int,), (int, float), (str,)
_OPTIONAL = (type(None),)
# Each field's accepted wire types: a garbled record must fail here, not in
# whatever later formats it (``hotswap status``).
_TYPES: dict[str, tuple[type, ...]] = {
    "agent_id": _STR,
    "host": _STR,
    "pid": _INT,
    "state": _STR,
    "version": _INT + _OPTIONAL,
    "lineage": _STR + _OPTIONAL,
    "manifest_digest": _STR + _OPTIONAL,
    "last_error": _STR + _OPTIONAL,
    "rejected_version": _INT + _OPTIONAL,
    "rejection": (dict,),
    "rejected_tensors": _INT + _OPTIONAL,
    "rejected_versions": (list, type(None)),
    "fetch_seconds": _NUM,
    "validate_seconds": _NUM,
    "apply_seconds": _NUM,
    "bytes_fetched": _INT,
    "last_fetched": _INT + _OPTIONAL,
    "applied_count": _INT,
    "rejected_count": _INT,
    "updated": _NUM,
    "encodings": (list, type(None)),
    "track": _STR + _OPTIONAL,
    "health": (dict, type(None)),
    "health_at": _NUM + _OPTIONAL,
    "probe_failures": _INT,
    "last_probe": _STR + _OPTIONAL,
    "pinned": _INT + _OPTIONAL,
    "group": _STR + _OPTIONAL,
    "rank": _INT + _OPTIONAL,
    "world": _INT + _OPTIONAL,
}


def _check(name: str, value: Any) -> Any:
    ok = isinstance(value, _TYPES[name]) and not isinstance(value, bool)
    if ok and name == "encodings" and value is not None:
        ok = len(value) <= MAX_LIST and all(isinstance(e, str) and len(e) <= 64 for e in value)
    if ok and name == "rejected_versions" and value is not None:
        ok = len(value) <= MAX_LIST and all(type(v) is int for v in value)
    if ok and name == "rejection":
        ok = all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(r, str) for r in v)
            for k, v in value.items()
        )
    if ok and name in ("track", "group") and value is not None:
        ok = is_name(value)
    if ok and name in ("rank", "world") and value is not None:
        ok = 0 <= value <= MAX_WORLD
    if ok and name == "health" and value is not None:
        ok = len(value) <= MAX_HEALTH and all(health_entry(k, v) for k, v in value.items())
    if not ok:
        raise FormatError(f"agent status field {name!r} has a bad value {value!r:.80}")
    if name == "health" and value is not None:
        return {k: float(v) for k, v in value.items()}
    if value is not None and _TYPES[name] in (_NUM, _NUM + _OPTIONAL):
        return float(value)
    return value


def health_entry(name: object, value: object) -> bool:
    """Whether ``name: value`` may stand among an agent's health numbers: a valid key name
    of at most ``MAX_HEALTH_NAME`` characters and a finite int or float (not a bool).

    Example:
        >>> health_entry("p99_ms", 12.5), health_entry("p99 ms", 1.0)
        (True, False)
        >>> health_entry("errors", float("nan")), health_entry("up", True)
        (False, False)
    """
    if not isinstance(name, str) or len(name) > MAX_HEALTH_NAME or not is_name(name):
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def remember_rejection(recent: list[int] | None, version: int) -> list[int]:
    """``recent`` rejected versions with ``version`` added last, at most ``RECENT_REJECTIONS``.

    Example:
        >>> remember_rejection([3, 4], 4), remember_rejection(None, 7)
        ([3, 4], [7])
    """
    kept = [v for v in (recent or []) if v != version]
    return [*kept, version][-RECENT_REJECTIONS:]


def rejected(s: AgentStatus) -> list[int]:
    """Every version ``s`` says it rejected (its recent ones, or the last from older agents)."""
    versions = set(s.rejected_versions or [])
    if s.rejected_version is not None:
        versions.add(s.rejected_version)
    return sorted(versions)


def live(s: AgentStatus, heartbeat: bool) -> bool:
    """Whether the agent is part of the fleet: its heartbeat lives and it was not stopped.

    A stopped agent writes ``state="stopped"`` as its last record; its
    heartbeat lives on until its ttl runs out, but it serves nothing new.

    Example:
        >>> live(AgentStatus("a", "h", 1, state="idle"), True)
        True
        >>> live(AgentStatus("a", "h", 1, state="stopped"), True)
        False
    """
    return heartbeat and s.state != "stopped"


def encode(status: AgentStatus) -> bytes:
    return bytes(msgpack.packb(asdict(status), use_bin_type=True))


def decode(data: bytes) -> AgentStatus:
    """Parse a status record; FormatError for anything malformed."""
    if not data:
        # Also what the store hands over for a record too large to read.
        raise FormatError(f"agent status is empty or over the {MAX_STATUS_BYTES}-byte limit")
    if len(data) > MAX_STATUS_BYTES:
        raise FormatError(f"agent status is {len(data)} bytes, over the {MAX_STATUS_BYTES} limit")
    try:
        raw: Any = msgpack.unpackb(
            data,
            raw=False,
            max_array_len=MAX_LIST,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )
    except Exception as e:
        raise FormatError(f"agent status is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(raw, dict) or not {"agent_id", "host", "pid"} <= set(raw):
        raise FormatError("agent status lacks agent_id, host or pid")
    return AgentStatus(**{k: _check(k, v) for k, v in raw.items() if k in _FIELDS})
