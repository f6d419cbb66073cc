"""Partial subscription (issue 19): ranks that hold a slice of each tensor fetch only the
chunks that cover it, verify each against the manifest's chunk digests, and copy the
slice in place. In-process agents stand in for the ranks of a tensor-parallel group."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import cast

import blake3
import pytest
import redis
import torch
from agent_support import MODEL, commit_raw

from hotswap import codec, delta, keys
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.entries import CHUNK_DIGEST_BYTES, TensorEntry
from hotswap.errors import ConfigError, FormatError, ValidationError
from hotswap.reporter import ApplyReport
from hotswap.settings import HotswapSettings
from hotswap.slice_check import chunk_digests
from hotswap.slice_read import byte_range, covering
from hotswap.slices import Halos, Part, ShardSpec, SliceEntry, Slicer
from hotswap.store import Store
from publisher.publisher import Publisher

# Rows of 300 float32 (1200 bytes) against 64 KiB chunks: no slice starts on a chunk.
OUT, IN = 512, 300
NAMES = ("layers.0.weight", "layers.1.weight", "layers.2.weight")
ALL = (*NAMES, "layers.0.bias")


def full_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(OUT, IN, generator=g) for n in NAMES}
    state["layers.0.bias"] = torch.randn(OUT, generator=g)
    return state


def part_of(t: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    return t.chunk(spec.world_size, spec.dim)[spec.rank]


def live_slices(
    spec: ShardSpec, names: tuple[str, ...], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A rank's model: zeros of each tensor's slice shape (the bias, 1-D, whole on dim 1)."""
    state = {n: t.to(dtype) for n, t in full_state(0).items() if n in names}
    return {
        n: torch.zeros_like(part_of(t, spec) if t.dim() > spec.dim else t) for n, t in state.items()
    }


class Rank:
    """One in-process agent holding slice ``spec`` of every tensor, with its apply reports."""

    def __init__(
        self,
        settings: HotswapSettings,
        spec: ShardSpec,
        names: tuple[str, ...] = ALL,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.spec = spec
        self.live = live_slices(spec, names, dtype)
        self.reports: dict[int, ApplyReport] = {}
        self.agent = Agent(
            self.live,
            MODEL,
            settings=settings,
            shards={"layers.*": spec},
            on_applied=self.reports.__setitem__,
            name=f"rank-{spec.rank}",
        )

    def holds(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Bit-exact: every live tensor is its slice of ``state``."""
        for n, t in state.items():
            want = part_of(t, self.spec) if t.dim() > self.spec.dim else t
            if self.live[n].view(torch.uint8).tolist() != want.view(torch.uint8).tolist():
                return False
        return True


def ranks(
    settings: HotswapSettings, n: int, dim: int = 0, names: tuple[str, ...] = ALL
) -> Iterator[list[Rank]]:
    with ExitStack() as stack:
        group = [Rank(settings, ShardSpec(r, n, dim), names) for r in range(n)]
        for rank in group:
            stack.enter_context(rank.agent)
        yield group


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def publish(settings: HotswapSettings, client: redis.Redis, state: dict[str, torch.Tensor]) -> int:
    with Publisher(MODEL, settings=settings, connection=client) as pub:
        return pub.publish(state)


# -- pure ------------------------------------------------------------------------------


def test_shard_spec_parts_and_refusals() -> None:
    assert [ShardSpec(r, 4).part("w", (8, 3)) for r in range(4)] == [
        Part(0, 0, 2),
        Part(0, 2, 4),
        Part(0, 4, 6),
        Part(0, 6, 8),
    ]
    assert ShardSpec(1, 2, 1).part("w", (8, 6)) == Part(1, 3, 6)
    with pytest.raises(ConfigError) as e:
        ShardSpec(0, 3).part("w", (8, 3))
    assert str(e.value) == (
        "tensor 'w': dimension 0 of 8 elements does not split into 3 equal parts; "
        "give a callable that returns its Part"
    )
    with pytest.raises(ConfigError) as e:
        ShardSpec(4, 4)
    assert str(e.value) == "ShardSpec rank 4 is not in 0..3"
    with pytest.raises(ConfigError) as e:
        Slicer({"*": ShardSpec(0, 2, 1)}).part("b", (8,))
    assert str(e.value) == "tensor 'b' of shape [8] has no dimension 1 to shard"


def test_byte_ranges_and_covering_chunks() -> None:
    e = TensorEntry("w", "F32", (OUT, IN), OUT * IN * 4, "0" * 64, 65536, 0.0, 0.0)
    rows = OUT // 4 * IN * 4  # a quarter's bytes
    assert byte_range(e, Part(0, 128, 256)) == (rows, 2 * rows)
    assert covering(e, Part(0, 128, 256)) == range(rows // 65536, -(-2 * rows // 65536))
    # A column slice spans from row 0 to the last row: every chunk.
    assert covering(e, Part(1, 75, 150)) == range(e.chunks)


def test_chunk_digests_travel_in_a_format_3_manifest_and_a_wrong_count_is_refused() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4096
    e = TensorEntry(
        "w",
        "U8",
        (len(data),),
        len(data),
        blake3.blake3(data).hexdigest(),
        4096,
        1.0,
        255.0,
        chunk_digests=chunk_digests(memoryview(data), 4096),
    )
    m = mf.Manifest("m", 1, None, "ab" * 16, (e,), created=1.0)
    raw = mf.encode(m)
    assert msgpack_format(raw) == mf.FORMAT_CHUNKS
    assert mf.decode(raw).tensors[0].chunk_digests == e.chunk_digests
    assert e.chunk_digests is not None
    cut = dataclasses.replace(e, chunk_digests=e.chunk_digests[:-CHUNK_DIGEST_BYTES])
    short = mf.Manifest("m", 1, None, "ab" * 16, (cut,), created=1.0)
    with pytest.raises(FormatError) as err:
        mf.decode(mf.encode(short))
    assert str(err.value) == "manifest tensor 'w': 32 bytes of chunk digests, 3 chunks need 48"


def msgpack_format(raw: bytes) -> int:
    import msgpack

    return int(msgpack.unpackb(raw, raw=False)["format"])


# -- against Redis -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_its_row_slice_bit_exact_and_reads_about_one_nth(
    settings: HotswapSettings, client: redis.Redis, n: int
) -> None:
    state = full_state(1)
    v = publish(settings, client, state)
    chunk = settings.chunk_bytes
    for group in ranks(settings, n):
        for rank in group:
            assert rank.agent.wait_for(v, 15)
            assert rank.holds(state)
            got = rank.reports[v].bytes_fetched
            slice_bytes = nbytes(state) // n
            print(
                f"TP={n} rank {rank.spec.rank}: fetched {got} of {nbytes(state)} bytes "
                f"({got / nbytes(state):.3f}; the slice is {slice_bytes})"
            )
            # The slice, plus at most two boundary chunks per sliced tensor; the bias is
            # one chunk, read whole.
            assert slice_bytes <= got <= slice_bytes + 2 * chunk * len(NAMES) + OUT * 4


def test_a_corrupted_chunk_is_refused_by_the_rank_whose_slice_it_is_in(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    state = full_state(2)
    v = publish(settings, client, state)
    entry = store.manifest(v).by_name()["layers.1.weight"]
    assert entry.chunk_digests is not None
    key = keys.chunk_keys(store.ns, store.model, entry.digest, entry.chunk_bytes, 1)[0]
    good = cast(bytes, client.get(key))
    bad = bytes([good[0] ^ 1]) + good[1:]
    client.set(key, bad)  # chunk 0: rows 0..54, inside rank 0's quarter only
    r0, r3 = Rank(settings, ShardSpec(0, 4)), Rank(settings, ShardSpec(3, 4))
    before = {n: t.clone() for n, t in r0.live.items()}
    with r0.agent, r3.agent:
        assert r3.agent.wait_for(v, 15) and r3.holds(state)
        with pytest.raises(ValidationError) as e:
            r0.agent.wait_for(v, 15)
        want = entry.chunk_digests[:CHUNK_DIGEST_BYTES].hex()[:16]
        got = blake3.blake3(bad).digest(length=CHUNK_DIGEST_BYTES).hex()[:16]
        assert e.value.reasons == {
            "layers.1.weight": [
                f"model {MODEL!r} v{v} tensor 'layers.1.weight': chunk 0 of {entry.chunks} "
                f"hashes to {got}..., the manifest says {want}... (corrupted in Redis or in "
                "transit); run `hotswap verify` and publish again"
            ]
        }
        assert r0.agent.applied_version is None
        assert all(torch.equal(r0.live[n], before[n]) for n in before)
        assert store.head() == v


def test_an_old_manifest_without_chunk_digests_falls_back_to_a_whole_fetch(
    settings: HotswapSettings, store: Store
) -> None:
    state = full_state(3)
    v = commit_raw(store, state)  # entries as an older publisher wrote them
    assert all(e.chunk_digests is None for e in store.manifest(v).tensors)
    for group in ranks(settings, 2):
        for rank in group:
            assert rank.agent.wait_for(v, 15) and rank.holds(state)
            assert rank.reports[v].bytes_fetched == nbytes(state)


def test_a_column_slice_is_read_whole_and_holds_its_columns(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    state = {n: t for n, t in full_state(4).items() if t.dim() == 2}
    v = publish(settings, client, state)
    for group in ranks(settings, 2, dim=1, names=NAMES):
        for rank in group:
            assert rank.agent.wait_for(v, 15) and rank.holds(state)
            assert all(rank.live[n].shape == (OUT, IN // 2) for n in state)
            assert rank.reports[v].bytes_fetched == nbytes(state)


def test_the_slice_entry_keeps_the_published_digest_and_states_no_norm() -> None:
    e = TensorEntry("w", "BF16", (8, 4), 64, "1" * 64, 4096, 3.0, 1.0)
    s = SliceEntry.of(e, Part(0, 2, 4))
    assert (s.shape, s.nbytes, s.digest, s.full) == ((2, 4), 16, e.digest, e)
    assert math.isnan(s.norm)
    assert codec.dtype_from_name(s.dtype) == torch.bfloat16


def test_a_nan_in_one_rank_slice_is_refused_by_that_rank_only(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    state = full_state(5)
    state["layers.2.weight"][OUT - 1, 7] = math.nan  # the last row: rank 1's half
    v = publish(settings, client, state)
    r0, r1 = Rank(settings, ShardSpec(0, 2)), Rank(settings, ShardSpec(1, 2))
    with r0.agent, r1.agent:
        assert r0.agent.wait_for(v, 15) and r0.holds(state)
        with pytest.raises(ValidationError) as e:
            r1.agent.wait_for(v, 15)
        assert e.value.reasons == {
            "layers.2.weight": [f"1 of {OUT // 2 * IN} values are not finite (NaN or inf)"]
        }
        assert r1.agent.applied_version is None
        assert all(not t.any() for t in r1.live.values())  # still the zeros it started with


def test_tensors_takes_whole_tensors_by_glob_and_fetches_only_those(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    state = full_state(6)
    v = publish(settings, client, state)
    expert = {"layers.1.weight": torch.zeros(OUT, IN)}
    reports: dict[int, ApplyReport] = {}
    with Agent(
        expert,
        MODEL,
        settings=settings,
        tensors=["layers.1.*"],
        on_applied=reports.__setitem__,
    ) as agent:
        assert agent.wait_for(v, 15)
        assert torch.equal(expert["layers.1.weight"], state["layers.1.weight"])
        assert reports[v].bytes_fetched == OUT * IN * 4


def bf16(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.to(torch.bfloat16) for n, t in state.items()}


def sparse_step(state: Mapping[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """A few elements of each tensor change: a version stored as deltas of ``state``."""
    out = {n: t.clone() for n, t in state.items()}
    for t in out.values():
        t.view(-1)[offset::97] += 1.0
    return out


def frames_covering(store: Store, client: redis.Redis, version: int, spec: ShardSpec) -> int:
    total = 0
    for e in store.manifest(version).tensors:
        assert e.delta is not None
        chunks = covering(e, spec.part(e.name, e.shape))
        names = keys.chunk_keys(
            store.ns, store.model, e.delta.blob, e.chunk_bytes, chunks.stop, first=chunks.start
        )
        total += sum(int(client.strlen(n)) for n in names)
    return total


def frame_bytes(store: Store, version: int) -> int:
    return sum(e.delta.stored_bytes for e in store.manifest(version).tensors if e.delta)


def test_a_rank_decodes_only_the_frames_its_slice_needs(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    v1_state = bf16(full_state(7))
    v2_state = sparse_step(v1_state, 0)
    v3_state = sparse_step(v2_state, 5)
    late = Rank(settings, ShardSpec(1, 2), dtype=torch.bfloat16)  # starts at v2
    with Publisher(MODEL, settings=settings, connection=client) as pub, ExitStack() as stack:
        v1 = pub.publish(v1_state)
        group = [Rank(settings, ShardSpec(r, 2), dtype=torch.bfloat16) for r in range(2)]
        for rank in group:
            stack.enter_context(rank.agent)
            assert rank.agent.wait_for(v1, 15) and rank.holds(v1_state)
        v2 = pub.publish(v2_state)
        for rank in group:
            assert rank.agent.wait_for(v2, 15) and rank.holds(v2_state)
        v3 = pub.publish(v3_state)
        assert all(e.delta and e.delta.depth == 2 for e in store.manifest(v3).tensors)
        for rank in group:
            assert rank.agent.wait_for(v3, 15) and rank.holds(v3_state)
        stack.enter_context(late.agent)
        assert late.agent.wait_for(v3, 15) and late.holds(v3_state)
    for v in (v2, v3):
        for rank in group:
            got = rank.reports[v].bytes_fetched
            print(f"v{v} rank {rank.spec.rank}: {got} of the delta's {frame_bytes(store, v)} bytes")
            # Exactly the frames of the chunks that cover its half.
            assert got == frames_covering(store, client, v, rank.spec) < frame_bytes(store, v)
    # A rank with no boundary chunks of the content it runs rebuilds the whole tensor:
    # v1's full blobs and both deltas.
    assert late.reports[v3].bytes_fetched > nbytes(v1_state)


def test_a_corrupted_frame_in_a_rank_slice_is_refused_by_that_rank(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    v1_state = bf16(full_state(9))
    v2_state = sparse_step(v1_state, 3)
    with Publisher(MODEL, settings=settings, connection=client) as pub, ExitStack() as stack:
        v1 = pub.publish(v1_state)
        group = [Rank(settings, ShardSpec(r, 2), dtype=torch.bfloat16) for r in range(2)]
        for rank in group:
            stack.enter_context(rank.agent)
            assert rank.agent.wait_for(v1, 15)
        # Stage v2 by hand: corrupt frame 0 of one tensor (rank 0's rows) before a notice.
        v2 = pub.publish(v2_state, promote=False)
        entry = store.manifest(v2).by_name()["layers.1.weight"]
        assert entry.delta is not None and entry.chunk_digests is not None
        key = keys.chunk_keys(store.ns, store.model, entry.delta.blob, entry.chunk_bytes, 1)[0]
        frame = cast(bytes, client.get(key))
        bad = frame[:-1] + bytes([frame[-1] ^ 1])
        client.set(key, bad)
        base = raw_bytes(v1_state["layers.1.weight"])[: entry.chunk_bytes]
        what = f"model {MODEL!r} v{v2} tensor 'layers.1.weight': delta frame 0 of {entry.chunks}"
        try:  # what the rank finds: a frame that does not decode, or one that decodes wrong
            out = bytearray(len(base))
            delta.decode_frame(bad, base, memoryview(out), where=what, verify=False)
            got = blake3.blake3(out).digest(length=CHUNK_DIGEST_BYTES).hex()[:16]
            want = entry.chunk_digests[:CHUNK_DIGEST_BYTES].hex()[:16]
            reason = (
                f"model {MODEL!r} v{v2} tensor 'layers.1.weight': chunk 0 of {entry.chunks} "
                f"hashes to {got}..., the manifest says {want}... (corrupted in Redis or in "
                "transit); run `hotswap verify` and publish again"
            )
        except FormatError as undecodable:
            reason = f"{undecodable}; publish again"
        before = {n: t.clone() for n, t in group[0].live.items()}
        pub.promote(v2)
        assert group[1].agent.wait_for(v2, 15) and group[1].holds(v2_state)
        with pytest.raises(ValidationError) as refused:
            group[0].agent.wait_for(v2, 15)
        assert refused.value.reasons == {"layers.1.weight": [reason]}
        assert group[0].agent.applied_version == v1
        assert all(torch.equal(group[0].live[n], before[n]) for n in before)


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(codec.as_bytes(t))


def test_tied_names_share_one_sliced_fetch(settings: HotswapSettings, client: redis.Redis) -> None:
    weight = full_state(8)["layers.0.weight"]
    v = publish(settings, client, {"embed.weight": weight, "head.weight": weight.clone()})
    shared = torch.zeros(OUT // 2, IN)
    live = {"embed.weight": shared, "head.weight": shared}  # one storage, two names
    reports: dict[int, ApplyReport] = {}
    with Agent(
        live,
        MODEL,
        settings=settings,
        shards={"*": ShardSpec(1, 2)},
        on_applied=reports.__setitem__,
    ) as agent:
        assert agent.wait_for(v, 15)
        assert torch.equal(shared, weight[OUT // 2 :])
        assert reports[v].bytes_fetched < OUT * IN * 4 * 3 // 4  # one half, read once


def test_halos_keep_one_content_per_name_within_their_budget() -> None:
    h = Halos(budget=10)
    h.put("a", "d1", {0: b"1234"})
    h.put("a", "d2", {0: b"12345"})
    assert (h.get("a", "d1"), h.get("a", "d2"), h.nbytes) == (None, {0: b"12345"}, 5)
    h.put("b", "d3", {0: b"123456"})  # over the budget with a's: a (used longest ago) goes
    assert (h.get("a", "d2"), h.get("b", "d3"), h.nbytes) == (None, {0: b"123456"}, 6)
    h.put("c", "d4", {0: b"x" * 11})  # larger than the whole budget: not kept
    assert (h.get("c", "d4"), h.nbytes) == (None, 6)
