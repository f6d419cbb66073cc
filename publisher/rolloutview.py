"""What ``hotswap status`` says of a model's rollout: in progress, or how the last one ended.

Example:
    >>> lines({"state": "rolled_back", "version": 7, "base": 6, "reason": "canary a is gone"})
    ['rollout of v7 from v6: rolled back (canary a is gone)']
"""

from __future__ import annotations

from typing import Any

from hotswap.errors import FormatError
from hotswap.rollouts import RolloutIO
from hotswap.store import Store

# An ended rollout is shown this long after it ended.
SHOWN_AFTER_END = 3600.0
VERDICTS_SHOWN = 5


def view(store: Store) -> dict[str, Any] | None:
    """The rollout record as ``hotswap status --json`` shows it (None: none to show)."""
    io = RolloutIO(store, owner="status")
    try:
        record = io.read()
    except FormatError as e:
        return {"state": "unreadable", "error": str(e)}
    if record is None:
        return None
    now = io.now()
    if not record.running and record.ended is not None and now - record.ended > SHOWN_AFTER_END:
        return None
    lease = io.lease() if record.running else None
    bake_left = None
    if record.running and record.baking_since is not None:
        bake_left = max(0.0, record.bake - (now - record.baking_since))
    return {
        "state": record.state,
        "version": record.version,
        "base": record.base,
        "step": record.step + 1,
        "steps": record.steps,
        "members": len(record.members),
        "bake": record.bake,
        "bake_left": bake_left,
        "owner": None if lease is None else {"id": lease.owner, "lease_left": lease.left_ms / 1e3},
        "reason": record.reason,
        "verdicts": record.verdicts[-VERDICTS_SHOWN:],
    }


def lines(data: dict[str, Any] | None) -> list[str]:
    """``view``'s data in words, one line each (status prints them under the table)."""
    if data is None:
        return []
    if data["state"] == "unreadable":
        return [f"rollout record unreadable: {data['error']}"]
    head = f"rollout of v{data['version']} from v{data['base']}"
    if data["state"] != "running":
        ended = data["state"].replace("_", " ")
        return [f"{head}: {ended}" + (f" ({data['reason']})" if data.get("reason") else "")]
    where = f"step {data['step']} of {len(data['steps'])} ({data['steps'][data['step'] - 1]})"
    baking = (
        "waiting for its agents to run it"
        if data["bake_left"] is None
        else f"baking {data['bake_left']:.0f}s left"
    )
    owner = data["owner"]
    driven = (
        "no owner (its lease expired: rerun hotswap rollout to resume it)"
        if owner is None
        else f"driven by {owner['id']}"
    )
    out = [f"{head}: {where}, {data['members']} agents pinned, {baking}, {driven}"]
    out += [f"  {v}" for v in data.get("verdicts", [])]
    return out
