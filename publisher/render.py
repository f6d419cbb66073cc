"""What the CLI prints: plain data for ``--json`` and rich tables for people.

The ``*_data`` functions are pure (records in, JSON-able dicts out) and are
what ``--json`` prints; the ``*_table`` functions draw the same data. Every
string that came from Redis (an agent's record, a log entry, a manifest) is
drawn through ``plain``: never read as rich markup, and with the characters a
terminal would act on shown as escapes, because an agent's ACL user can write
any status record (docs/reliability.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from hotswap import keys
from publisher import rolloutview, views
from publisher.reports import GcReport, PublishReport, VerifyReport, describe

PHASES = {"hash": "hashing", "upload": "uploading", "verify": "verifying"}

# What a terminal acts on instead of printing: C0 controls (ESC starts a
# sequence that can clear the screen, retitle the window or set the
# clipboard), DEL, C1 controls (0x9b is a one-byte CSI), and the
# bidirectional marks, embeddings, overrides and isolates that reorder text
# (and line/paragraph separators).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def plain(text: object, style: str = "") -> Text:
    """Text from Redis as a terminal may show it: no markup, control characters as escapes."""
    return Text(_UNSAFE.sub(_escaped, str(text)), style=style)


def size(n: int | None) -> str:
    return "-" if n is None else decimal(n)


def when(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
    except (OverflowError, OSError, ValueError):
        return f"{ts!r}"  # no calendar date (a NaN or a year past 9999): the number itself


# -- progress -------------------------------------------------------------------


class ProgressBars:
    """A rich progress bar per phase (bytes, rate, ETA), fed by the publisher's callback."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self.tasks.get(phase)
        if task is None:
            task = self.progress.add_task(PHASES.get(phase, phase), total=total)
            self.tasks[phase] = task
        self.progress.update(task, completed=done, total=total)


@contextmanager
def progress_bars(console: Console, enabled: bool) -> Iterator[ProgressBars | None]:
    """Progress bars on a terminal, nothing otherwise (pipes and --json stay clean)."""
    if not enabled:
        yield None
        return
    bars = ProgressBars(console)
    with bars.progress:
        yield bars


# -- publish / rollback / gc / verify ---------------------------------------------


def report_data(model: str, r: PublishReport) -> dict[str, Any]:
    return {"model": model, **asdict(r)}


def report_line(model: str, r: PublishReport) -> str | Text:
    if not r.created:
        return (
            f"model {model}: nothing changed since v{r.version}; no new version "
            f"(use --force to publish anyway)"
        )
    if r.kind == "rollback":
        back = (
            f"model {model}: rolled back to v{r.rollback_to} as v{r.version} "
            f"({r.tensors_changed} of {r.tensors_total} tensors differ from v{r.parent}"
            f"{removed_clause(r)}; {size(r.bytes_uploaded)} uploaded)"
        )
        if r.untrusted_parent:
            return plain(
                f"{back}; v{r.parent} was not trusted ({r.untrusted_parent}), "
                "so every tensor counts as changed"
            )
        return back
    line = (
        f"model {model}: published v{r.version}: {r.tensors_changed} of {r.tensors_total} "
        f"tensors changed{removed_clause(r)}, {size(r.bytes_uploaded)} uploaded, "
        f"{size(r.bytes_skipped)} already in Redis ({r.seconds:.2f}s)"
    ) + deltas_clause(r)
    if r.untrusted_parent:
        # The cause can quote a key id read from Redis: drawn as plain text.
        return plain(
            f"{line}; parent v{r.parent} was not trusted ({r.untrusted_parent}), "
            "so every tensor was checked and counted as changed"
        )
    return line


def removed_clause(r: PublishReport) -> str:
    """ ", N removed" when the version lacks tensors its parent had ("" otherwise),
    with what agents make of that: they refuse it unless their policy keeps their own."""
    if not r.tensors_removed:
        return ""
    return (
        f", {r.tensors_removed} removed: agents refuse a version that lacks tensors they "
        "serve unless their Policy(missing_tensors='keep')"
    )


def rollback_why(model: str, r: PublishReport) -> Text | None:
    """Why a rollback's default target is the version it is: the newer ones it passed over.

    Example:
        >>> r = PublishReport(9, 8, True, 3, 3, 0, 0, 0, 0.1, "rollback", 5,
        ...     skipped={8: "rejected by agent a", 7: "rejected by agent a"})
        >>> str(rollback_why("m", r))
        'model m: chose v5, passing over v8, v7: rejected by agent a'
    """
    if not r.skipped:
        return None
    # Reasons name agents and key ids read from Redis: plain text, never markup.
    return plain(f"model {model}: chose v{r.rollback_to}, passing over {describe(r.skipped)}")


def deltas_clause(r: PublishReport) -> str:
    """What a publish stored as deltas and where their bases came from ("" if nothing)."""
    if not r.tensors_delta and not r.bases:
        return ""
    keyframes = f", {r.keyframes} with a keyframe" if r.keyframes else ""
    bases = ", ".join(f"{where} {n}" for where, n in r.bases.items())
    read = f", {size(r.bytes_base_read)} read back" if r.bytes_base_read else ""
    gone = " (missing: full blobs)" if r.bases.get("missing") else ""
    return (
        f"; {r.tensors_delta} as deltas ({size(r.bytes_delta)}{keyframes}), "
        f"bases from {bases or 'none needed'}{read}{gone}"
    )


def gc_data(model: str, r: GcReport) -> dict[str, Any]:
    return {"model": model, **asdict(r)}


def gc_line(model: str, r: GcReport, namespace: str = "hotswap") -> str | Text:
    verb = "would delete" if r.dry_run else "deleted"
    kept = ", ".join(f"v{v}" for v in r.kept) or "nothing"
    gone = ", ".join(f"v{v}" for v in r.deleted_versions) or "no versions"
    line = (
        f"model {model}: kept {kept}; {verb} {gone} and {r.blobs_deleted} blobs "
        f"({size(r.bytes_freed)})" + young_clause(r)
    )
    if r.chain_versions:
        line += (
            f"; kept the manifests of {', '.join(f'v{v}' for v in r.chain_versions)} for "
            "kept versions' chains of deltas (only their blobs on those chains)"
        )
    if r.broken_chains:
        where, why = next(iter(r.broken_chains.items()))
        more = f" and {len(r.broken_chains) - 1} more" if len(r.broken_chains) > 1 else ""
        line += (
            f"; {where}{more} cannot be reconstructed from stored blobs ({why}): "
            "their own blobs kept; publish a full version"
        )
    if r.pins_unknown:
        more = f" and {len(r.pins_unknown) - 1} more" if len(r.pins_unknown) > 1 else ""
        line += (
            f"; kept every version: the agent records cannot all be read "
            f"({r.pins_unknown[0]}{more}), so an agent may run any of them; "
            "see `hotswap status`"
        )
    if r.malformed_index:
        member, why = next(iter(r.malformed_examples.items()))
        line += (
            f"; skipped {r.malformed_index} malformed blob index entries "
            f"(e.g. {member!r}: {why}), left in place: look at them with "
            f"ZRANGE {keys.blob_index_key(namespace, model)} 0 -1 and remove them with ZREM"
        )
    # Agent ids, problems and index members came from Redis: drawn as plain text.
    return plain(line) if r.pins_unknown or r.malformed_index or r.broken_chains else line


def young_clause(r: GcReport, now: float | None = None) -> str:
    """What gc kept for the grace period, and when it becomes collectable.

    The grace period (``HOTSWAP_GC_GRACE_SECONDS``) keeps the blobs a publish
    still in flight uploaded before its version names them.
    """
    if not r.blobs_kept_young:
        return ""
    now = time.time() if now is None else now
    grace = f"the {_span(r.grace_seconds)} grace period (HOTSWAP_GC_GRACE_SECONDS)"
    first, last = r.young_from, r.young_until
    when_ = ""
    if first is not None and last is not None:
        a, b = _span(max(0.0, first - now)), _span(max(0.0, last - now))
        when_ = f"; collectable in {b}" if a == b else f"; the first collectable in {a}, all in {b}"
    return (
        f"; kept {r.blobs_kept_young} unreferenced blobs a publish touched within "
        f"{grace}{when_} (run gc again then, or `--grace 0` when no publish is running)"
    )


def _span(seconds: float) -> str:
    """A duration as people say it: "45 s", "12 min", "1.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def verify_data(model: str, r: VerifyReport) -> dict[str, Any]:
    return {"model": model, "ok": r.ok, **asdict(r)}


# -- status ---------------------------------------------------------------------


def status_table(data: dict[str, Any]) -> Table:
    head = data["head"]
    table = Table(title=plain(f"model {data['model']}: head " + (f"v{head}" if head else "none")))
    cols = ("agent", "host", "pid", "version", "state", "lag", "last rejection", "heartbeat")
    # Track, pin, health and probe failures: a column only when some agent has any.
    notes = [views.safety_note(a) for a in data["agents"]]
    safety = ("track, health, probes",) if any(notes) else ()
    for col in (*cols, "fetched last", "reads", *safety):
        right = col in ("pid", "version", "lag", "fetched last")
        table.add_column(col, justify="right" if right else "left")
    for a, note in zip(data["agents"], notes, strict=True):
        lag = a["lag"]
        lag_text = (
            "other lineage"
            if not a["same_lineage"]
            # Content no stored version has under this number: never "0".
            else "[red]diverged[/red]"
            if a.get("diverged")
            else "-"
            if lag is None
            else f"[green]{lag}[/green]"
            if lag == 0
            else f"[yellow]{lag}[/yellow]"
        )
        age = "-" if a["heartbeat_age"] is None else f"{a['heartbeat_age']:.1f}s ago"
        beat = (
            age
            if a["alive"]
            else f"stopped ({age})"
            if a["state"] == "stopped"
            else f"[red]expired[/red] ({age})"
        )
        reason = a["last_rejection"]
        table.add_row(
            plain(a["agent_id"]),
            plain(a["host"]),
            str(a["pid"]),
            "-" if a["version"] is None else f"v{a['version']}",
            plain(a["state"], "" if a["alive"] else "dim"),
            lag_text,
            "-" if not reason else plain(f"v{a['rejected_version']}: {reason}"),
            beat,
            "-" if a.get("last_fetched") is None else _mb(a["last_fetched"]),
            reads(a.get("encodings")),
            *([plain(note or "-")] if safety else []),
        )
    return table


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def reads(encodings: list[str] | None) -> Text:
    """What an agent can apply: full blobs, and the delta encodings it reports decoding
    (an agent older than deltas reports none); ``status --json`` lists it as ``reads``."""
    return plain(f"full, {', '.join(encodings)}" if encodings else "full only")


def print_status(console: Console, data: dict[str, Any]) -> None:
    """``hotswap status`` for people: the table, a line when no agent has reported,
    and with signing keys the signed head and the versions those keys cannot verify."""
    console.print(status_table(data))
    if not data["agents"]:
        console.print("no agent has reported for this model")
    for line in signing_lines(data.get("signing")):
        console.print(line)
    for problem in data.get("problems", []):
        # Read from Redis, where any agent's user may have written: plain text.
        console.print(plain(f"agent records: {problem}", "yellow"))
    for why in data.get("unhealthy", []):
        console.print(plain(f"not healthy: {why}", "red"))
    for said in rolloutview.lines(data.get("rollout")):
        # Verdicts quote agents' records: plain text.
        console.print(plain(said))
    for line in group_lines(data.get("groups") or []):
        console.print(line)


def group_lines(groups: list[dict[str, Any]]) -> list[Text]:
    """A line per process group: its version when all its ranks agree, else why not.

    Example:
        >>> [t.plain for t in group_lines([{"group": "g", "world": 2, "state": "agreed",
        ...     "version": 3, "ranks": {"0": "a", "1": "b"}}])]
        ['group g (2 ranks): v3']
    """
    lines = []
    for g in groups:
        head = f"group {g['group']} ({g['world']} ranks): "
        if g["state"] == "agreed":
            runs = "nothing yet" if g["version"] is None else f"v{g['version']}"
            lines.append(plain(head + runs))
        else:
            lines.append(plain(head + f"no version ({g['state']})", "red"))
    return lines


def signing_lines(signing: dict[str, Any] | None) -> list[Text]:
    """What agents with this environment's signing keys make of the head and versions."""
    if signing is None:
        return []
    head = signing["head"]
    lines = [
        plain(f"signed head: refused by agents: {head['error']}", "red")
        if "error" in head
        else plain(f"signed head: v{head['version']} (key id {head['key_id']})")
    ]
    for row in signing["unverifiable"]:
        lines.append(
            plain(
                f"v{row['version']}: not verifiable with these signing keys, agents refuse it: "
                f"{row['reason']}",
                "yellow",
            )
        )
    return lines
