"""Which blobs an agent fetches to reach a tensor's content, and when a keyframe is due.

Pure: imports no Redis; data in, a plan out.

A version's tensor may be stored as a full blob or as a delta from another
content (``hotswap.delta``). An agent that runs the delta's base fetches the
delta alone; one that started late, missed versions or rolled back starts
from a full blob (a keyframe) or the bytes it runs, and follows a chain of
deltas, symmetric ones either way. ``plan_route`` picks the route that
fetches the fewest bytes; ``keyframe_due`` tells the publisher when to store
a full blob instead of extending the chain, so chains stay short.

A chain that does not start at a full blob or the live bytes, or needs more
than ``MAX_CHAIN`` deltas, is refused (FormatError): a route always ends at
bytes whose every link was checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hotswap.errors import FormatError

# The longest chain of deltas an agent decodes after a full blob, and the
# publisher writes before a new full blob (keyframe): bounds a late agent's
# decoding work. Long enough that ``KEYFRAME_FRACTION`` usually decides for
# small deltas (bench/delta_codec.py, "Chains").
MAX_CHAIN = 32
# A keyframe is also due once the deltas since the last one add up to this
# fraction of the full tensor: a late agent then fetches at most this much
# more than a full transfer, and Redis holds at most this much in deltas.
KEYFRAME_FRACTION = 0.5


@dataclass(frozen=True)
class Full:
    """A full blob of one content, and the bytes fetching it moves.

    ``blob`` is the caller's name for it (what to fetch); the planner only
    carries it.
    """

    digest: str
    stored_bytes: int
    blob: str = ""


@dataclass(frozen=True)
class Delta:
    """A delta blob from the content ``base`` to ``result``; XOR deltas also go back.

    ``blob`` is the caller's name for it, carried as for ``Full``.
    """

    base: str
    result: str
    stored_bytes: int
    symmetric: bool = True
    blob: str = ""


@dataclass(frozen=True)
class Link:
    """One delta of a route, read forwards or (symmetric ones) backwards."""

    delta: Delta
    backwards: bool = False

    @property
    def start(self) -> str:
        return self.delta.result if self.backwards else self.delta.base

    @property
    def end(self) -> str:
        return self.delta.base if self.backwards else self.delta.result


@dataclass(frozen=True)
class Route:
    """What to fetch to reach ``target``: ``full`` (None: the live bytes), then ``links``."""

    target: str
    full: Full | None
    links: tuple[Link, ...]

    @property
    def fetch_bytes(self) -> int:
        return (self.full.stored_bytes if self.full else 0) + sum(
            link.delta.stored_bytes for link in self.links
        )


def keyframe_due(
    links: int,
    chain_bytes: int,
    full_bytes: int,
    *,
    max_chain: int = MAX_CHAIN,
    fraction: float = KEYFRAME_FRACTION,
) -> bool:
    """Whether the publisher should store a full blob instead of one more delta.

    Args:
        links: deltas since the tensor's last full blob, the next one included.
        chain_bytes: their stored bytes, the next one's included.
        full_bytes: the tensor's full size.
        max_chain, fraction: the bounds (defaults ``MAX_CHAIN``, ``KEYFRAME_FRACTION``).

    Returns:
        True when the chain would pass either bound.
    """
    return links > max_chain or chain_bytes > fraction * full_bytes


Cost = tuple[int, int]  # (bytes to fetch, links to decode): fewer bytes first


def plan_route(
    target: str,
    *,
    live: str | None = None,
    fulls: Iterable[Full] = (),
    deltas: Iterable[Delta] = (),
    max_chain: int = MAX_CHAIN,
    where: str = "tensor",
) -> Route:
    """The route to the content ``target`` that fetches the fewest bytes.

    Starts at the live bytes (free) or a full blob, then follows at most
    ``max_chain`` deltas, symmetric ones either way; of equal byte counts,
    fewer links win. A cycle of deltas never makes a route cheaper, so the
    route visits each content once; one with no full blob or live bytes on
    it reaches nothing.

    Args:
        target: the digest wanted.
        live: the digest the agent runs now, None if it runs none.
        fulls: the full blobs the agent may fetch.
        deltas: the delta blobs it may fetch.
        max_chain: the most deltas a route may decode.
        where: names the model, version and tensor in messages.

    Returns:
        The route; no links and no full blob when ``live`` is ``target``.

    Raises:
        FormatError: a delta from a content to itself, a negative size, or
            no route: the chain does not end at a full blob or the live
            bytes, or needs more than ``max_chain`` deltas.

    Example::

        route = chain.plan_route(
            "c", live="p", fulls=[chain.Full("c", 100)], deltas=[chain.Delta("p", "c", 2)]
        )
        # Route(target="c", full=None, links=(Link(Delta("p", "c", 2)),))
    """
    edges = _edges(list(deltas), where)
    starts = _starts(fulls, live, where)
    best = _cheapest(starts, edges, target, max_chain)
    if best is None:
        raise _no_route(target, starts, edges, max_chain, where)
    return best


def plan_routes(
    targets: Iterable[str],
    *,
    fulls: Iterable[Full] = (),
    deltas: Iterable[Delta] = (),
    max_chain: int = MAX_CHAIN,
    where: str = "tensor",
) -> dict[str, Route | FormatError]:
    """``plan_route`` from stored blobs alone to each of ``targets``, planned once.

    One search gives the cheapest route to every content the blobs reach,
    so gc plans each tensor's contents together, not one search each.

    Returns:
        Each target's route, or the FormatError ``plan_route`` would raise for it.

    Raises:
        FormatError: a malformed delta or full blob (a size below 0, a delta
            from a content to itself): no target's route can be trusted.

    Example::

        routes = chain.plan_routes(["b", "c"], fulls=[chain.Full("a", 100)],
                                   deltas=[chain.Delta("a", "b", 2), chain.Delta("b", "c", 3)])
        # {"b": Route("b", Full("a", 100), (...,)), "c": Route(...)}
    """
    edges = _edges(list(deltas), where)
    starts = _starts(fulls, None, where)
    layer = _layers(starts, edges, max_chain)
    out: dict[str, Route | FormatError] = {}
    for target in targets:
        if target in layer:
            _, full, links = layer[target]
            out[target] = Route(target, full, links)
        else:
            out[target] = _no_route(target, starts, edges, max_chain, where)
    return out


def _starts(
    fulls: Iterable[Full], live: str | None, where: str
) -> dict[str, tuple[Cost, Full | None]]:
    """Where a route may start: each content's cheapest full blob, and the live bytes (free)."""
    starts: dict[str, tuple[Cost, Full | None]] = {}
    for f in fulls:
        if f.stored_bytes < 0:
            raise FormatError(f"{where}: full blob of {f.digest[:16]} has {f.stored_bytes} bytes")
        if f.digest not in starts or f.stored_bytes < starts[f.digest][0][0]:
            starts[f.digest] = ((f.stored_bytes, 0), f)
    if live is not None:
        starts[live] = ((0, 0), None)
    return starts


def _edges(deltas: list[Delta], where: str) -> dict[str, list[Link]]:
    """Each content's outgoing links: deltas forwards, symmetric ones also backwards."""
    out: dict[str, list[Link]] = {}
    for d in deltas:
        if d.base == d.result:
            raise FormatError(f"{where}: a delta from {d.base[:16]} to itself")
        if d.stored_bytes < 0:
            raise FormatError(f"{where}: delta to {d.result[:16]} has {d.stored_bytes} bytes")
        out.setdefault(d.base, []).append(Link(d))
        if d.symmetric:
            out.setdefault(d.result, []).append(Link(d, backwards=True))
    return out


def _cheapest(
    starts: dict[str, tuple[Cost, Full | None]],
    edges: dict[str, list[Link]],
    target: str,
    max_chain: int,
) -> Route | None:
    """The cheapest route of at most ``max_chain`` links, None if there is none."""
    layer = _layers(starts, edges, max_chain)
    if target not in layer:
        return None
    _, full, links = layer[target]
    return Route(target, full, links)


Layer = dict[str, tuple[Cost, Full | None, tuple[Link, ...]]]


def _layers(
    starts: dict[str, tuple[Cost, Full | None]],
    edges: dict[str, list[Link]],
    max_chain: int,
) -> Layer:
    """The cheapest way of at most ``max_chain`` links to every content reachable.

    Bellman-Ford by layers: layer k holds the cheapest way to each content in
    at most k links. Keeping only the cheapest way overall would lose a
    dearer one with fewer links that still fits the bound.
    """
    layer: Layer = {d: (cost, full, ()) for d, (cost, full) in starts.items()}
    for _ in range(max_chain):
        nxt = dict(layer)
        for content, ((nbytes, hops), full, links) in layer.items():
            for link in edges.get(content, ()):
                cost = (nbytes + link.delta.stored_bytes, hops + 1)
                known = nxt.get(link.end)
                if known is None or cost < known[0]:
                    nxt[link.end] = (cost, full, (*links, link))
        if all(nxt[d][0] == layer[d][0] for d in layer) and len(nxt) == len(layer):
            break
        layer = nxt
    return layer


def _no_route(
    target: str,
    starts: dict[str, tuple[Cost, Full | None]],
    edges: dict[str, list[Link]],
    max_chain: int,
    where: str,
) -> FormatError:
    """Why no route of at most ``max_chain`` links reaches ``target``."""
    seen, todo = set(starts), list(starts)
    while todo:
        for link in edges.get(todo.pop(), ()):
            if link.end not in seen:
                seen.add(link.end)
                todo.append(link.end)
    if target in seen:
        return FormatError(
            f"{where}: reaching {target[:16]}... needs more than {max_chain} deltas after "
            "a full blob; publish a full version"
        )
    return FormatError(
        f"{where}: no full blob or live bytes start a chain of deltas to {target[:16]}... "
        "(a chain must end at a full blob); publish a full version"
    )
