"""Retention planning, pure: which versions to keep and which blobs may go.

The publisher reads the state from Redis, asks these functions what to
delete, and re-reads the blob scores right before deleting (``collectable``
runs twice) so that a publish that touched a blob meanwhile saves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hotswap import keys

# Malformed index members a gc report names (it counts them all).
EXAMPLES = 5
# Characters of a malformed member shown: a member may be up to 512 MB.
EXAMPLE_CHARS = 100


@dataclass(frozen=True)
class RetentionPlan:
    """Versions kept (and why) and versions whose manifests may be deleted."""

    keep: list[int]
    delete: list[int]
    reasons: dict[int, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pins:
    """What live agents run, as far as their records tell.

    ``unknown`` says why some live agent's version cannot be known (a record
    that does not decode, a key of the wrong type): gc then keeps every
    version, since that agent may run any of them.
    """

    versions: list[int]
    unknown: list[str] = field(default_factory=list)


def plan_retention(
    versions: Iterable[int],
    head: int | None,
    keep: int,
    running: Iterable[int],
    *,
    running_unknown: bool = False,
) -> RetentionPlan:
    """Keep the newest ``keep`` stored versions, the head, and every version an agent runs.

    Args:
        versions: every version whose manifest is stored.
        head: the current head (kept even if it were somehow older than the newest N).
        keep: how many of the newest versions to keep (at least 1).
        running: versions live agents report running.
        running_unknown: some live agent's version cannot be read: keep every version.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    stored = sorted(set(versions))
    reasons: dict[int, list[str]] = {}
    if running_unknown:
        for v in stored:
            reasons.setdefault(v, []).append("an agent whose record is unreadable may run it")
    for v in stored[-keep:]:
        reasons.setdefault(v, []).append(f"newest {keep}")
    if head is not None and head in stored:
        reasons.setdefault(head, []).append("head")
    for v in sorted(set(running)):
        if v in stored:
            reasons.setdefault(v, []).append("an agent runs it")
    kept = sorted(reasons)
    return RetentionPlan(keep=kept, delete=[v for v in stored if v not in reasons], reasons=reasons)


@dataclass(frozen=True)
class IndexSplit:
    """The blob index split into ids gc may act on and members it must skip."""

    valid: dict[str, float]
    malformed: dict[str, str]  # member -> why it is not an id a publish writes

    def examples(self) -> dict[str, str]:
        """The first few malformed members (shortened) and why, for reports."""
        first = sorted(self.malformed)[:EXAMPLES]
        return {m[:EXAMPLE_CHARS]: self.malformed[m] for m in first}


def split_index(index: Mapping[str, float], max_tensor_bytes: int) -> IndexSplit:
    """Check every blob index member before gc builds a key name from any.

    Anyone with write access to Redis may add members: one that is not
    ``digest:chunk_bytes:chunks`` within the limits (``keys.blob_id_problem``)
    is skipped, never deleted, and reported, so gc runs on and the operator
    sees what to remove.
    """
    valid: dict[str, float] = {}
    malformed: dict[str, str] = {}
    for blob, score in index.items():
        problem = keys.blob_id_problem(blob, max_tensor_bytes)
        if problem is None:
            valid[blob] = score
        else:
            malformed[blob] = problem
    return IndexSplit(valid, malformed)


def collectable(
    scores: Mapping[str, float | None],
    referenced: Iterable[str],
    now: float,
    grace: float,
) -> list[str]:
    """Blob ids no kept version references and no publish touched within ``grace`` seconds.

    A blob without a score (already gone from the index) is left alone.
    """
    ref = set(referenced)
    cutoff = now - grace
    return sorted(
        blob
        for blob, score in scores.items()
        if blob not in ref and score is not None and score < cutoff
    )


def rescore(candidates: Sequence[str], scores: Sequence[float | None]) -> dict[str, float | None]:
    """Pair candidate blob ids with freshly read scores."""
    return dict(zip(candidates, scores, strict=True))
