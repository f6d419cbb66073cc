"""Hostile delta frames and delta graphs: the frame decoder and the chain planner.

What is proven: ``delta.decode_frame`` lets only FormatError or IntegrityError
escape, with one-line messages, for mutated frames of every encoding, random
payloads, well-formed zstd frames of hostile sparse indices and shuffled
planes of hostile widths and sizes behind a valid header, and random bytes;
whatever it accepts is exactly the chunk the frame's digest names.
``chain.plan_route`` either refuses with a one-line FormatError or returns a
route that starts at a full blob or the live bytes, follows connected links
to the target within the bound, visits each content once, and fetches no
more bytes than the cheapest route an exhaustive search finds. Cases are
derandomized, as in test_rel_fuzz.py.
"""

from __future__ import annotations

import collections
import itertools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import blake3
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotswap import chain, delta
from hotswap.encodings import Encoding
from hotswap.errors import FormatError, HotswapError, IntegrityError

pytestmark = pytest.mark.reliability

CASES: collections.Counter[str] = collections.Counter()
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(cases: int) -> settings:
    return settings(BASE, max_examples=cases)


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    rows = ", ".join(f"{k} {n}" for k, n in sorted(CASES.items()))
    print(f"\ndelta fuzz cases: {sum(CASES.values())} ({rows})")


def refused(kind: str, fn: Callable[[], Any], allowed: type[HotswapError]) -> Any:
    """Run one case: its value, or None after checking the error is ``allowed`` and one line."""
    CASES[kind] += 1
    try:
        return fn()
    except HotswapError as e:
        assert isinstance(e, allowed), f"{kind}: {type(e).__name__} is not {allowed.__name__}: {e}"
        assert str(e) and "\n" not in str(e), f"{kind}: message is not one line: {e!s:.300}"
        return None


# -- frames ----------------------------------------------------------------------------

CHUNK = 3000
OLD = bytes(range(256)) * 11 + bytes(CHUNK - 2816)
NEW = bytes(b ^ (1 if i % 97 == 0 else 0) for i, b in enumerate(OLD))
SEEDS = {e: delta.encode_frame(NEW, OLD, itemsize=2, encoding=e) for e in Encoding}
XOR = bytes(x ^ y for x, y in zip(NEW, OLD))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte-level edits: flips, overwrites, inserts, cuts, repeats."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x28, 0x7F, 0x80, 0xB5, 0xFD, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def decode(frame: bytes, base: bytes = OLD, out_len: int = CHUNK) -> bytes | None:
    out = bytearray(out_len)

    def run() -> bytes:
        delta.decode_frame(frame, base, memoryview(out), where="fuzz")
        return bytes(out)

    got = refused("frame", run, IntegrityError)
    if got is not None:
        # Accepted bytes are the ones the frame's own header names, nothing else.
        assert bytes(blake3.blake3(got).digest()) == delta.read_header(frame).result_digest
        assert len(got) == out_len
    return got  # type: ignore[no-any-return]


@fuzz(500)
@given(st.sampled_from(list(SEEDS.values())).flatmap(mutated))
def test_mutated_frames(frame: bytes) -> None:
    got = decode(frame)
    if got is not None and frame[: delta.HEADER_BYTES] in {
        f[: delta.HEADER_BYTES] for f in SEEDS.values()
    }:
        assert got == NEW


def sparse_body(draw: st.DrawFn) -> bytes:
    """A sparse head and a well-formed zstd frame of gaps and values: sizes mostly honest,
    so that most cases reach the index checks."""
    width = draw(st.sampled_from([1, 2, 4, 8, 1, 2, 4, 8, 0, 3, 16, 255]))
    gaps = draw(
        st.lists(st.integers(0, 3) | st.integers(0, 400) | st.integers(0, 2**32 - 1), max_size=40)
    )
    count = len(gaps) + draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, -1, CHUNK]))
    values = draw(st.binary(min_size=len(gaps) * width, max_size=len(gaps) * width))
    body = struct.pack(f"<{len(gaps)}I", *gaps) + values
    return struct.pack("<BI", width, max(count, 0)) + zstandard.ZstdCompressor().compress(body)


def shuffle_body(draw: st.DrawFn) -> bytes:
    """A shuffle head and a well-formed zstd frame: widths that tile the chunk or not,
    sizes honest or not."""
    width = draw(st.sampled_from([1, 2, 4, 8, 2, 4, 0, 3, 16, 255]))
    size = CHUNK + draw(st.sampled_from([0, 0, 0, 0, 1, -1, -CHUNK, CHUNK]))
    planes = draw(st.binary(min_size=0, max_size=64)) * (max(size, 0) // 64 + 1)
    return bytes([width]) + zstandard.ZstdCompressor().compress(planes[: max(size, 0)])


@fuzz(400)
@given(
    st.sampled_from(list(Encoding)),
    st.one_of(
        st.binary(max_size=200),
        mutated(zstandard.ZstdCompressor().compress(XOR)),
        st.binary(max_size=64).map(lambda b: b"\x28\xb5\x2f\xfd" + b),
        st.composite(sparse_body)(),
        st.composite(shuffle_body)(),
    ),
)
def test_payloads_behind_a_valid_header(encoding: Encoding, payload: bytes) -> None:
    got = decode(SEEDS[encoding][: delta.HEADER_BYTES] + payload)
    if got is not None:
        assert got == NEW


@fuzz(200)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_random_bytes_as_frames(frame: bytes, out_len: int) -> None:
    decode(frame, bytes(out_len), out_len)


# -- the chain planner -------------------------------------------------------------------

NODES = ["a", "b", "c", "d", "e", "f"]


@st.composite
def graphs(draw: st.DrawFn) -> tuple[str, str | None, list[chain.Full], list[chain.Delta], int]:
    """A small world of contents: a target, maybe live bytes, fulls and deltas, a bound."""
    node = st.sampled_from(NODES)
    fulls = draw(st.lists(st.builds(chain.Full, node, st.integers(-1, 500)), max_size=3))
    deltas = draw(
        st.lists(
            st.builds(chain.Delta, node, node, st.integers(-1, 300), st.booleans()), max_size=9
        )
    )
    return draw(node), draw(st.none() | node), fulls, deltas, draw(st.integers(0, 4))


def cheapest(
    target: str, live: str | None, fulls: list[chain.Full], deltas: list[chain.Delta], bound: int
) -> int | None:
    """The fewest bytes of any route, by trying every sequence of links (small worlds only)."""
    links = [chain.Link(d) for d in deltas]
    links += [chain.Link(d, backwards=True) for d in deltas if d.symmetric]
    starts = [(f.digest, f.stored_bytes) for f in fulls]
    if live is not None:
        starts.append((live, 0))
    best: int | None = None
    for start, cost in starts:
        for n in range(bound + 1):
            for path in itertools.product(links, repeat=n):
                at, total = start, cost
                for link in path:
                    if link.start != at:
                        break
                    at, total = link.end, total + link.delta.stored_bytes
                else:
                    if at == target and (best is None or total < best):
                        best = total
    return best


@fuzz(400)
@given(graphs())
def test_routes_are_connected_bounded_simple_and_cheapest(
    world: tuple[str, str | None, list[chain.Full], list[chain.Delta], int],
) -> None:
    target, live, fulls, deltas, bound = world
    route = refused(
        "route",
        lambda: chain.plan_route(
            target, live=live, fulls=fulls, deltas=deltas, max_chain=bound, where="fuzz"
        ),
        FormatError,
    )
    malformed = any(f.stored_bytes < 0 for f in fulls) or any(
        d.stored_bytes < 0 or d.base == d.result for d in deltas
    )
    if route is None:
        assert malformed or cheapest(target, live, fulls, deltas, bound) is None
        return
    assert not malformed
    assert route.target == target and len(route.links) <= bound
    at = route.full.digest if route.full is not None else live
    assert route.full in fulls or route.full is None
    seen = [at]
    for link in route.links:
        assert link.start == at and link.delta in deltas
        assert not link.backwards or link.delta.symmetric
        at = link.end
        seen.append(at)
    assert at == target and len(seen) == len(set(seen))
    assert route.fetch_bytes == cheapest(target, live, fulls, deltas, bound)
