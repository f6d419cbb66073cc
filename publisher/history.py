"""What ``hotswap log`` prints: the model's history, typed for ``--json``, drawn for people.

Every string from the log (written by any publisher, or by hand) is drawn
through ``render.plain``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from publisher.render import plain, size, when


def _number(text: str | None) -> float | None:
    # A log field that is not a number is shown as missing, not a crash.
    try:
        value = float(text or "nan")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# The log's fields by type: Redis streams hold strings, ``log --json`` gives numbers.
LOG_INTS = frozenset(
    {
        "version",
        "parent",
        "rollback_to",
        "tensors_changed",
        "tensors_removed",
        "bytes_uploaded",
        "bytes_total",
        "tensors_delta",
        "keyframes",
        "bytes_delta",
        "blobs_deleted",
        "promoted",
    }
)
LOG_FLOATS = frozenset({"created"})


def log_data(rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """The log as ``hotswap log --json`` prints it: numbers as numbers, "" as null,
    ``versions_deleted`` a list, ``bases`` a dict (as ``publish --json``); a field
    that is not what its name says stays text.

    Example:
        >>> log_data([{"version": "8", "parent": "", "created": "1.5", "message": "8"}])
        [{'version': 8, 'parent': None, 'created': 1.5, 'message': '8'}]
    """
    return [{k: _typed(k, v) for k, v in row.items()} for row in rows]


def _typed(name: str, text: str) -> Any:
    if name in LOG_INTS or name in LOG_FLOATS:
        if text == "":
            return None
        try:
            return int(text) if name in LOG_INTS else float(text)
        except ValueError:
            return text  # written by hand, or by another release: shown as found
    if name == "bases":
        return _bases(text)
    if name == "versions_deleted":
        parts = [p for p in text.split(",") if p]
        return [int(p) for p in parts] if all(p.isdigit() for p in parts) else text
    return text


def _bases(text: str) -> dict[str, int] | str:
    """The log's ``bases`` ("memory 18, redis 3") as ``publish --json`` gives them: a dict.

    Example:
        >>> _bases("memory 18, redis 3"), _bases("")
        ({'memory': 18, 'redis': 3}, {})
    """
    found: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        where, _, count = part.rpartition(" ")
        if not part:
            continue
        if not where or not count.isdigit():
            return text  # not what a publisher writes: shown as found
        found[where] = int(count)
    return found


def log_table(model: str, rows: Sequence[dict[str, str]]) -> Table:
    table = Table(title=plain(f"model {model}: history (newest first)"))
    for col in ("version", "kind", "time", "author", "changed", "added to Redis", "message"):
        table.add_column(col, justify="right" if col in ("version", "changed") else "left")
    for row in rows:
        created = _number(row.get("created"))
        kind = _kind(row)
        if row.get("untrusted_parent"):
            kind += f" (parent untrusted: {row['untrusted_parent']})"
        uploaded = _number(row.get("bytes_uploaded"))
        total = _number(row.get("bytes_total"))
        moved = "-" if uploaded is None else f"{size(int(uploaded))} of {size(int(total or 0))}"
        deltas = _number(row.get("tensors_delta"))
        if deltas and uploaded is not None:
            moved += f" ({int(deltas)} as deltas)"
        table.add_row(
            plain(f"v{row['version']}" if row.get("version") else "-"),
            plain(kind),
            when(created or 0),
            plain(row.get("author", "")),
            plain(row.get("tensors_changed", "-") + _removed(row)),
            moved,
            plain(row.get("message", "")),
        )
    return table


def _kind(row: dict[str, str]) -> str:
    """What a log entry did, in words: a rollback's target, a version stored without
    becoming head, a promotion and the head it replaced.

    Example:
        >>> _kind({"kind": "publish", "promoted": "0"}), _kind({"kind": "promote", "parent": "3"})
        ('publish (not head)', 'promoted to head (was v3)')
    """
    kind = row.get("kind", "?")
    if kind == "rollback" and row.get("rollback_to"):
        kind = f"rollback to v{row['rollback_to']}"
    if kind == "promote":
        kind = "promoted to head" + (f" (was v{row['parent']})" if row.get("parent") else "")
    if row.get("promoted") == "0":
        kind += " (not head)"
    return kind


def _removed(row: dict[str, str]) -> str:
    """ ", N removed" for a version that dropped tensors of its parent ("" otherwise)."""
    removed = row.get("tensors_removed", "")
    return f", {removed} removed" if removed not in ("", "0") else ""
