"""The Lua scripts behind ``Store``'s atomic steps, and what their refusals mean; imports no Redis.

Each script takes every key it touches in KEYS (built by ``hotswap.keys``:
no script spells a key), so that on a cluster they share the model's slot.
"""

from __future__ import annotations

from hotswap.errors import VersionConflict

# KEYS: seq, head. The next number is max(seq, head) + 1: a seq that was
# evicted, deleted or restored older than head costs no failed publish.
# A value that is not a number counts as 0 (head's own check reports it).
RESERVE = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local head = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local v = math.max(math.floor(seq), math.floor(head)) + 1
redis.call('SET', KEYS[1], string.format('%d', v))
return v
"""

# The end of a commit that moves head, and of a promote: set head and the
# signed record ('' = none: delete a record that would name an older head),
# then announce. On a cluster the notice goes to the shard channel, which
# shares the keys' slot (hash tag): only that shard hears it. A server
# without SPUBLISH (Redis < 7) or a user without the right broadcasts
# instead; agents listen on both channels.
_MAKE_HEAD = """
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[7] == '' then redis.call('DEL', KEYS[4]) else redis.call('SET', KEYS[4], ARGV[7]) end
local shard = ARGV[8] == 'sharded' and redis.pcall('SPUBLISH', ARGV[4], ARGV[5]) or nil
if type(shard) ~= 'number' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
"""

# KEYS: head, manifest:V, log, signed head record. ARGV: parent ('' = none), V,
# manifest bytes, channel, notice, log maxlen, record, how to announce
# (``subscription.notice_mode``), promote ('1' or '0'), then log field/value
# pairs. Manifest, log entry, head and record change together or not at all;
# a version not promoted is stored and logged, and head, record and agents
# are left as they were.
COMMIT = (
    """
local head = redis.call('GET', KEYS[1]) or ''
if head ~= ARGV[1] then return {'conflict', head} end
if head ~= '' and tonumber(ARGV[2]) <= tonumber(head) then return {'stale', head} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'exists', head} end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 10))
if ARGV[9] ~= '1' then return {'ok', head} end
"""
    + _MAKE_HEAD
    + """
return {'ok', head}
"""
)

# KEYS and ARGV as COMMIT's (the manifest bytes and the promote flag unused):
# make the stored manifest V head if head is still its parent. V already head
# answers 'already' and writes nothing, so that a promote whose reply was
# lost, or a rollout run again after it was killed, finds its work done.
PROMOTE = (
    """
local head = redis.call('GET', KEYS[1]) or ''
if head == ARGV[2] then return {'already', head} end
if head ~= ARGV[1] then return {'conflict', head} end
if head ~= '' and tonumber(ARGV[2]) <= tonumber(head) then return {'stale', head} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'missing', head} end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 10))
"""
    + _MAKE_HEAD
    + """
return {'ok', head}
"""
)

# KEYS: head, signed head record. ARGV: expected head, expected record ('' =
# none), new record. A re-sign must not overwrite the record of a commit that
# landed since it read head: that would name the old head again.
RESIGN = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
return 1
"""


def commit_refused(
    model: str, version: int, parent: int | None, status: bytes, head: str
) -> VersionConflict:
    """The error for a commit script's refusal ``status`` (``exists``, ``stale`` or a head
    that moved), ``head`` being the head it found (``"none"``: no head)."""
    if status == b"exists":
        return VersionConflict(f"model {model!r} v{version} already exists; versions are immutable")
    if status == b"stale":
        return VersionConflict(
            f"model {model!r}: v{version} is not newer than head v{head}; "
            "reserve a new version number"
        )
    read = "empty" if parent is None else f"v{parent}"
    now = "empty" if head == "none" else f"v{head}"
    return VersionConflict(
        f"model {model!r}: head is {now}, not {read} as this publish read it; "
        "another publisher committed first, publish again on top of it"
    )
