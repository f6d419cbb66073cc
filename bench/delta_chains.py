"""The keyframe policy of delta chains, simulated: ``python -m bench.delta_codec`` prints it.

For one tensor of an RL run, each publish stores a delta of a measured size
and, when ``hotswap.chain.keyframe_due`` says so, a full blob too; gc keeps
the last versions after each publish. The table says what Redis holds, what
an agent at the parent moves, and what a fresh agent fetches, for each
(``MAX_CHAIN``, ``KEYFRAME_FRACTION``): the data behind their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotswap import chain
from hotswap.errors import FormatError


@dataclass(frozen=True)
class ChainRow:
    """One keyframe policy over an RL run of one tensor whose deltas store ``delta_pct``."""

    delta_pct: float
    max_chain: int
    fraction: float
    redis_avg: float
    redis_max: float
    io_pct: float
    late_max: float
    longest: int


def _route(
    content: str,
    live: str | None,
    fulls: list[chain.Full],
    deltas: list[chain.Delta],
    max_chain: int,
) -> chain.Route:
    return chain.plan_route(content, live=live, fulls=fulls, deltas=deltas, max_chain=max_chain)


def _collect(
    kept: range,
    fulls: dict[str, chain.Full],
    deltas: dict[str, chain.Delta],
    newest: chain.Full,
    max_chain: int,
) -> set[str]:
    """The blobs gc keeps: each kept version's route from nothing (through the newest
    keyframe where one fits, so older keyframes go) and the delta from its parent."""
    needed: set[str] = set()
    for v in kept:
        try:
            route = _route(f"v{v}", None, [newest], list(deltas.values()), max_chain)
        except FormatError:
            route = _route(f"v{v}", None, list(fulls.values()), list(deltas.values()), max_chain)
        needed |= {link.delta.blob for link in route.links}
        needed.add(route.full.blob if route.full else "")
        if f"v{v}" in deltas:
            needed.add(deltas[f"v{v}"].blob)
    return needed


def simulate_chains(
    delta_fraction: float, max_chain: int, fraction: float, versions: int = 100, keep: int = 10
) -> ChainRow:
    """Publish ``versions`` steps of one tensor, gc to the last ``keep`` after each.

    Each step stores a delta of ``delta_fraction`` of the tensor and, when
    ``chain.keyframe_due`` says so, a full blob too (the delta still serves
    agents at the parent, and older kept versions read it backwards). Measures
    what Redis holds after gc, the bytes in and out for an agent at the parent
    (% of a full transfer: upload plus fetch of the whole tensor), and what a
    fresh agent fetches.
    """
    full_bytes = 1_000_000
    size = round(delta_fraction * full_bytes)
    fulls: dict[str, chain.Full] = {}
    deltas: dict[str, chain.Delta] = {}
    links = chain_bytes = 0
    newest = chain.Full("v1", full_bytes, "f1")
    held: list[float] = []
    moved: list[float] = []
    late: list[float] = []
    longest = 0
    for v in range(1, versions + 1):
        content, uploaded = f"v{v}", 0
        if v > 1:
            deltas[content] = chain.Delta(f"v{v - 1}", content, size, blob=f"d{v}")
            uploaded += size
        if v == 1 or chain.keyframe_due(
            links + 1, chain_bytes + size, full_bytes, max_chain=max_chain, fraction=fraction
        ):
            newest = fulls[content] = chain.Full(content, full_bytes, f"f{v}")
            uploaded += full_bytes
            links = chain_bytes = 0
        else:
            links, chain_bytes = links + 1, chain_bytes + size
        live = f"v{v - 1}" if v > 1 else None
        at_parent = _route(content, live, list(fulls.values()), list(deltas.values()), max_chain)
        fresh = _route(content, None, list(fulls.values()), list(deltas.values()), max_chain)
        moved.append((uploaded + at_parent.fetch_bytes) / (2 * full_bytes))
        late.append(fresh.fetch_bytes / full_bytes)
        longest = max(longest, len(fresh.links))
        needed = _collect(range(max(1, v - keep + 1), v + 1), fulls, deltas, newest, max_chain)
        fulls = {k: f for k, f in fulls.items() if f.blob in needed}
        deltas = {k: d for k, d in deltas.items() if d.blob in needed}
        stored = sum(f.stored_bytes for f in fulls.values()) + sum(
            d.stored_bytes for d in deltas.values()
        )
        held.append(stored / full_bytes)
    return ChainRow(
        100 * delta_fraction,
        max_chain,
        fraction,
        sum(held) / versions,
        max(held),
        100 * sum(moved) / versions,
        max(late),
        longest,
    )


def print_chains(delta_pcts: list[float], grid: bool) -> None:
    print(
        "\nChains: 100 versions of an RL run, gc to the last 10 after each publish; Redis "
        "holds x the tensor (average, max), in+out % of a full transfer for an agent at "
        "the parent, a fresh agent's fetch x the tensor (max), its longest chain"
    )
    print(
        "| delta % of full | MAX_CHAIN | KEYFRAME_FRACTION | Redis avg | Redis max | in+out % "
        "| fresh agent max | longest chain |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    policies = [(c, f) for c in (8, 16, 32, 64) for f in (0.25, 0.5, 1.0)] if grid else []
    for pct in delta_pcts:
        for max_chain, fraction in policies or [(chain.MAX_CHAIN, chain.KEYFRAME_FRACTION)]:
            r = simulate_chains(pct / 100, max_chain, fraction)
            default = (max_chain, fraction) == (chain.MAX_CHAIN, chain.KEYFRAME_FRACTION)
            print(
                f"| {r.delta_pct:.2f} | {r.max_chain}{' (default)' if default else ''} | "
                f"{r.fraction} | {r.redis_avg:.2f} | {r.redis_max:.2f} | {r.io_pct:.1f} | "
                f"{r.late_max:.2f} | {r.longest} |",
                flush=True,
            )
