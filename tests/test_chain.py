"""Routes to a tensor's content (full blob, or a chain of deltas) and keyframes (no server)."""

from __future__ import annotations

import pytest

from hotswap import chain
from hotswap.chain import Delta, Full, Link, Route
from hotswap.errors import FormatError

FULL = 1000


def run(n: int, size: int = 20, symmetric: bool = True) -> list[Delta]:
    """Deltas v1 -> v2 -> ... -> vn, each ``size`` bytes."""
    return [Delta(f"v{i}", f"v{i + 1}", size, symmetric, f"d{i + 1}") for i in range(1, n)]


def contents(route: Route) -> list[str]:
    """Every content a route passes, from its start to the target."""
    start = route.full.digest if route.full else route.links[0].start
    return [start, *(link.end for link in route.links)]


def test_an_agent_at_the_parent_fetches_one_delta() -> None:
    deltas = run(3)
    route = chain.plan_route("v3", live="v2", fulls=[Full("v3", FULL)], deltas=deltas)
    assert route == Route("v3", None, (Link(deltas[1]),))
    assert route.fetch_bytes == 20


def test_an_agent_already_there_fetches_nothing() -> None:
    route = chain.plan_route("v3", live="v3", fulls=[Full("v3", FULL)])
    assert route == Route("v3", None, ())
    assert route.fetch_bytes == 0


def test_a_late_agent_takes_the_keyframe_and_the_chain_after_it() -> None:
    deltas = run(5)
    route = chain.plan_route("v5", fulls=[Full("v1", FULL, "f1")], deltas=deltas)
    assert route.full == Full("v1", FULL, "f1")
    assert [link.delta.blob for link in route.links] == ["d2", "d3", "d4", "d5"]
    assert route.fetch_bytes == FULL + 4 * 20


def test_an_agent_that_missed_versions_follows_the_chain_from_what_it_runs() -> None:
    deltas = run(7)
    fulls = [Full("v1", FULL), Full("v5", FULL)]
    route = chain.plan_route("v7", live="v3", fulls=fulls, deltas=deltas)
    assert route.full is None and contents(route) == ["v3", "v4", "v5", "v6", "v7"]
    # Once the chain from the live bytes costs more than the keyframe's, the keyframe wins.
    far = chain.plan_route("v7", live="v3", fulls=fulls, deltas=run(7, size=600))
    assert far.full == Full("v5", FULL) and contents(far) == ["v5", "v6", "v7"]


def test_a_rollback_by_one_step_reads_the_delta_backwards() -> None:
    deltas = run(7)
    route = chain.plan_route("v6", live="v7", fulls=[Full("v1", FULL)], deltas=deltas)
    assert route == Route("v6", None, (Link(deltas[5], backwards=True),))
    assert route.links[0].start == "v7" and route.links[0].end == "v6"


def test_a_rollback_by_many_steps_and_one_that_cannot_go_backwards() -> None:
    route = chain.plan_route("v2", live="v7", fulls=[Full("v1", FULL)], deltas=run(7))
    assert route.full is None and contents(route) == ["v7", "v6", "v5", "v4", "v3", "v2"]
    one_way = run(7, symmetric=False)
    route = chain.plan_route("v6", live="v7", fulls=[Full("v1", FULL)], deltas=one_way)
    assert route.full == Full("v1", FULL) and len(route.links) == 5


def test_fewer_bytes_win_and_equal_bytes_go_to_fewer_links() -> None:
    deltas = run(3, size=600)
    route = chain.plan_route("v3", fulls=[Full("v1", FULL), Full("v3", FULL)], deltas=deltas)
    assert route == Route("v3", Full("v3", FULL), ())
    cheap = chain.plan_route("v3", live="v1", fulls=[Full("v3", FULL)], deltas=deltas)
    assert cheap == Route("v3", Full("v3", FULL), ())  # 1000 bytes beat 1200
    tie = [Delta("a", "c", 10), Delta("a", "b", 5), Delta("b", "c", 5)]
    assert len(chain.plan_route("c", live="a", deltas=tie).links) == 1


def test_the_cheapest_route_within_the_bound_is_found_past_a_cheaper_longer_one() -> None:
    # To b: a -> x -> y -> b costs 3 bytes in 3 links, a -> b 50 bytes in one; then b -> t.
    deltas = [
        Delta("a", "x", 1),
        Delta("x", "y", 1),
        Delta("y", "b", 1),
        Delta("a", "b", 50),
        Delta("b", "t", 1),
    ]
    route = chain.plan_route("t", live="a", deltas=deltas, max_chain=2)
    assert contents(route) == ["a", "b", "t"] and route.fetch_bytes == 51
    assert chain.plan_route("t", live="a", deltas=deltas, max_chain=4).fetch_bytes == 4


def test_a_chain_that_does_not_end_at_a_full_blob_is_refused() -> None:
    with pytest.raises(FormatError) as e:
        chain.plan_route("v3", deltas=run(3), where="m v3 tensor 'w'")
    assert str(e.value) == (
        "m v3 tensor 'w': no full blob or live bytes start a chain of deltas to v3... "
        "(a chain must end at a full blob); publish a full version"
    )


def test_a_cycle_without_a_full_blob_is_refused_and_with_one_is_walked_once() -> None:
    loop = [Delta("a", "b", 1, False), Delta("b", "c", 1, False), Delta("c", "a", 1, False)]
    with pytest.raises(FormatError) as e:
        chain.plan_route("c", live="z", fulls=[Full("z", FULL)], deltas=loop, where="w")
    assert str(e.value).startswith("w: no full blob or live bytes start a chain of deltas to c")
    route = chain.plan_route("a", fulls=[Full("b", FULL)], deltas=loop)
    assert contents(route) == ["b", "c", "a"]
    with pytest.raises(FormatError) as e:
        chain.plan_route("b", live="a", deltas=[Delta("a", "a", 1)], where="w")
    assert str(e.value) == "w: a delta from a to itself"


def test_a_chain_longer_than_the_bound_is_refused() -> None:
    deltas = run(chain.MAX_CHAIN + 2)
    target = f"v{chain.MAX_CHAIN + 2}"
    with pytest.raises(FormatError) as e:
        chain.plan_route(target, fulls=[Full("v1", FULL)], deltas=deltas, where="w")
    assert str(e.value) == (
        f"w: reaching {target}... needs more than {chain.MAX_CHAIN} deltas after a full "
        "blob; publish a full version"
    )
    route = chain.plan_route(target, fulls=[Full("v2", FULL)], deltas=deltas)
    assert len(route.links) == chain.MAX_CHAIN


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(FormatError) as e:
        chain.plan_route("b", fulls=[Full("b", -1)], where="w")
    assert str(e.value) == "w: full blob of b has -1 bytes"
    with pytest.raises(FormatError) as e:
        chain.plan_route("b", live="a", deltas=[Delta("a", "b", -5)], where="w")
    assert str(e.value) == "w: delta to b has -5 bytes"


def test_keyframe_due_at_either_bound() -> None:
    assert not chain.keyframe_due(chain.MAX_CHAIN, 10, FULL)
    assert chain.keyframe_due(chain.MAX_CHAIN + 1, 10, FULL)
    limit = int(chain.KEYFRAME_FRACTION * FULL)
    assert not chain.keyframe_due(1, limit, FULL)
    assert chain.keyframe_due(1, limit + 1, FULL)
    assert chain.keyframe_due(3, 0, FULL, max_chain=2)


def test_routes_planned_together_are_each_the_route_planned_alone() -> None:
    """gc plans a tensor's contents in one search: the same routes, the same refusals."""
    deltas = [*run(chain.MAX_CHAIN + 3), Delta("x", "y", 5), Delta("v4", "w", 3, False)]
    fulls = [Full("v1", FULL), Full("v5", FULL // 2)]
    targets = [f"v{i}" for i in range(1, chain.MAX_CHAIN + 4)] + ["w", "y", "nowhere"]
    together = chain.plan_routes(targets, fulls=fulls, deltas=deltas, max_chain=8, where="w")
    assert set(together) == set(targets)
    for target in targets:
        try:
            alone: Route | FormatError = chain.plan_route(
                target, fulls=fulls, deltas=deltas, max_chain=8, where="w"
            )
        except FormatError as e:
            alone = e
        got = together[target]
        if isinstance(alone, FormatError):
            assert isinstance(got, FormatError) and str(got) == str(alone)
        else:
            assert got == alone
    assert isinstance(together["v20"], FormatError) and "needs more than 8" in str(together["v20"])
    assert contents(together["w"]) == ["v5", "v4", "w"]  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="w: delta to b has -5 bytes"):
        chain.plan_routes(["b"], fulls=fulls, deltas=[Delta("a", "b", -5)], where="w")
