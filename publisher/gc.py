"""Retention planning, pure: which versions to keep and which blobs may go.

The publisher reads the state from Redis, asks these functions what to
delete, and re-reads the blob scores right before deleting (``collectable``
runs twice) so that a publish that touched a blob meanwhile saves it.

With deltas (issue 14) a kept version needs more than its own blobs: a
tensor stored as a delta needs a chain of deltas from some full blob
(``needed_blobs``). The route is planned over the kept versions' entries
first, so an older kept version reaches the newest keyframe backwards
(XOR deltas are symmetric) and the keyframes before it can go: what keeps
Redis near one model's size. Only a content no kept entry reaches takes
older versions' manifests along (their blobs on the route, nothing else).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hotswap import blobs, chain, keys
from hotswap.errors import FormatError
from hotswap.manifest import Manifest

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


@dataclass(frozen=True)
class Needs:
    """What the kept versions need: blobs, older manifests their chains go through, and
    the tensors no stored blobs reach.

    ``chain_versions`` are versions outside the retention whose manifests are
    kept because a kept version's route uses blobs only their entries name
    (readers plan from manifests); their other blobs may go. ``broken`` maps
    ``"v5 tensor 'w'"`` to why no stored blobs reach it (reported, its own
    blobs kept).
    """

    blobs: set[str]
    chain_versions: list[int] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)


class _Graph:
    """The stored full and delta blobs that manifest entries name, grouped by which
    contents deltas connect (a route never leaves its group)."""

    def __init__(self, stored: Collection[str]) -> None:
        self.stored = stored
        self.parent: dict[str, str] = {}  # union-find over content digests
        self.fulls: dict[str, dict[str, chain.Full]] = {}  # group -> digest -> full
        self.deltas: dict[str, dict[str, chain.Delta]] = {}  # group -> blob id -> delta
        self.named_by: dict[str, list[int]] = {}  # blob id -> versions naming it, as added

    def group(self, digest: str) -> str:
        root = self.parent.setdefault(digest, digest)
        while root != self.parent[root]:
            self.parent[root] = root = self.parent[self.parent[root]]
        return root

    def _join(self, a: str, b: str) -> None:
        ra, rb = self.group(a), self.group(b)
        if ra != rb:
            self.parent[rb] = ra
            self.fulls.setdefault(ra, {}).update(self.fulls.pop(rb, {}))
            self.deltas.setdefault(ra, {}).update(self.deltas.pop(rb, {}))

    def add(self, m: Manifest) -> None:
        """Count every stored blob ``m``'s entries name (an unstored one leads nowhere)."""
        for e in m.tensors:
            if not e.chunks:
                continue
            for blob in blobs.blob_ids(e):
                if blob in self.stored:
                    self.named_by.setdefault(blob, []).append(m.version)
            blob = keys.blob_id(e.digest, e.chunk_bytes, e.chunks)
            if (e.delta is None or e.delta.keyframe) and blob in self.stored:
                full = chain.Full(e.digest, e.nbytes, blob=blob)
                self.fulls.setdefault(self.group(e.digest), {}).setdefault(e.digest, full)
            blob = keys.blob_id(e.delta.blob, e.chunk_bytes, e.chunks) if e.delta else ""
            if e.delta is not None and blob in self.stored:
                self._join(e.delta.base, e.digest)
                link = chain.Delta(e.delta.base, e.digest, e.delta.stored_bytes, blob=blob)
                self.deltas.setdefault(self.group(e.digest), {})[blob] = link

    def has_full(self, digest: str) -> bool:
        return bool(self.fulls.get(self.group(digest)))

    def routes(self, digests: Collection[str]) -> dict[str, chain.Route | FormatError]:
        """The cheapest route from a full blob to each of ``digests`` (a FormatError where
        none): one search per group of contents, not one per content."""
        by_group: dict[str, list[str]] = {}
        for digest in digests:
            by_group.setdefault(self.group(digest), []).append(digest)
        out: dict[str, chain.Route | FormatError] = {}
        for g, members in by_group.items():
            fulls = self.fulls.get(g, {}).values()
            try:
                out.update(
                    chain.plan_routes(members, fulls=fulls, deltas=self.deltas.get(g, {}).values())
                )
            except FormatError as e:
                out.update(dict.fromkeys(members, e))
        return out


def _route_blobs(route: chain.Route) -> set[str]:
    return {link.delta.blob for link in route.links} | ({route.full.blob} if route.full else set())


def needed_blobs(
    kept: Mapping[int, Manifest], older: Iterator[Manifest], stored: Collection[str]
) -> Needs:
    """The blobs the ``kept`` versions need to be reconstructed, and what else that takes.

    Each kept entry keeps its own blobs (full, delta, or both) and those of the
    route ``chain.plan_route`` gives to its content from no live bytes, over
    the stored blobs (``stored``: blob ids) the kept entries name. A content
    none of them reaches reads ``older`` manifests (newest first, consumed
    only as far as needed) until one does; their versions become
    ``chain_versions``. What still reaches nothing is ``broken``.
    """
    graph = _Graph(stored)
    for m in kept.values():
        graph.add(m)
    need: set[str] = set()
    todo: dict[str, str] = {}  # digest -> "vN tensor 'x'" of one kept entry holding it
    for v, m in sorted(kept.items()):
        for e in m.tensors:
            need.update(blobs.blob_ids(e))
            if e.chunks:
                todo.setdefault(e.digest, f"v{v} tensor {e.name!r}")
    chains: set[int] = set()
    unrouted = _routes(graph, todo, need, chains, kept)
    while unrouted:
        more = next(older, None)
        if more is None:
            break
        graph.add(more)
        unrouted = _routes(graph, {d: w for d, (_, w) in unrouted.items()}, need, chains, kept)
    broken = {where: why for why, where in unrouted.values()}
    return Needs(need, sorted(chains), dict(sorted(broken.items())))


def _routes(
    graph: _Graph,
    todo: Mapping[str, str],
    need: set[str],
    chains: set[int],
    kept: Mapping[int, Manifest],
) -> dict[str, tuple[str, str]]:
    """Route every content of ``todo`` (digest -> where) whose group has a full blob; add
    the route's blobs to ``need``, and to ``chains`` the newest version outside ``kept``
    naming each blob no kept version names. Returns the rest: digest -> (why, where)."""
    left: dict[str, tuple[str, str]] = {}
    routable = [d for d in todo if graph.has_full(d)]
    routes = graph.routes(routable)
    for digest, where in todo.items():
        if not graph.has_full(digest):
            left[digest] = ("no full blob starts a chain of deltas to it", where)
            continue
        route = routes[digest]
        if isinstance(route, FormatError):
            left[digest] = (str(route).split(": ", 1)[-1].split("; ")[0], where)
            continue
        for blob in _route_blobs(route):
            need.add(blob)
            namers = graph.named_by.get(blob, [])
            if not any(v in kept for v in namers):
                chains.add(namers[0])
    return left
