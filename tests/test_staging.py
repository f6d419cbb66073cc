"""Planning, staging and in-place apply (the CUDA code paths, run on CPU)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import redis
import torch
from agent_support import Ten, commit_raw, entry_for

from hotswap import codec, hostmem, keys, staging, validate
from hotswap import manifest as mf
from hotswap.copies import apply, pairs
from hotswap.errors import ConfigError, StoreUnavailable
from hotswap.hostmem import HostMemory, anonymous, populate, populate_behind
from hotswap.staging import (
    ALIGN,
    LiveModel,
    Staging,
    check_metadata,
    fetch,
    plan,
    prepare,
    typed,
)
from hotswap.store import Store
from hotswap.validate import Policy


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.out = torch.nn.Linear(4, 8, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("empty_a", torch.zeros(0))
        self.register_buffer("empty_b", torch.zeros(0))


def manifest_of(state: dict[str, torch.Tensor], version: int = 1) -> mf.Manifest:
    return mf.Manifest(
        model="m",
        version=version,
        parent=None,
        lineage="l" * 32,
        tensors=tuple(entry_for(k, v) for k, v in state.items()),
    )


def test_live_model_finds_ties_but_not_empty_tensors() -> None:
    live = LiveModel(Tied())
    assert live.ties() == [["emb.weight", "out.weight"]]
    assert live.canonical["out.weight"] == "emb.weight"
    assert live.canonical["empty_b"] == "empty_b"
    d = live.digests()
    assert d["emb.weight"] == d["out.weight"]
    assert d["emb.weight"] == codec.digest(codec.as_bytes(live.tensors["emb.weight"]))


def test_live_model_accepts_a_mapping() -> None:
    t = torch.ones(3)
    live = LiveModel({"a": t, "b": t[:2]})
    assert live.tensors["a"] is t
    assert live.ties() == []  # overlapping but different views are not tied


def test_plan_fetches_only_changed_tensors_once_per_storage() -> None:
    model = Tied()
    live = LiveModel(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["emb.weight"] = state["emb.weight"] + 1
    state["out.weight"] = state["emb.weight"]
    p = plan(manifest_of(state), live, live.digests(), set())
    assert [e.name for e in p.fetch] == ["emb.weight"]
    assert sorted(p.changed) == ["emb.weight", "out.weight"]
    assert p.nbytes == 8 * 4 * 4
    nothing = plan(manifest_of(dict(model.state_dict())), live, live.digests(), set())
    assert nothing.fetch == [] and nothing.changed == {}


def test_typed_view_shares_the_buffer() -> None:
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    e = entry_for("t", t)
    buf = torch.empty(e.nbytes, dtype=torch.uint8)
    view = typed(buf, e)
    view.copy_(t)
    assert view.data_ptr() == buf.data_ptr()
    assert bytes(buf.numpy()) == bytes(codec.as_bytes(t))
    scalar = typed(
        torch.empty(8, dtype=torch.uint8), entry_for("s", torch.tensor(1.5, dtype=torch.float64))
    )
    assert scalar.shape == ()
    empty = typed(torch.empty(0, dtype=torch.uint8), entry_for("e", torch.zeros(0, 5)))
    assert empty.shape == (0, 5)


def test_apply_copies_in_place_into_strided_and_parameter_tensors() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 4))
    base = torch.zeros(4, 4)
    strided = base.t()  # live tensors need not be contiguous
    before = (p.data_ptr(), strided.data_ptr())
    new_p, new_s = torch.randn(4, 4), torch.randn(4, 4)
    apply([(p, new_p), (strided, new_s)])
    assert (p.data_ptr(), strided.data_ptr()) == before
    assert torch.equal(p.detach(), new_p) and torch.equal(strided, new_s)
    assert torch.equal(base, new_s.t())
    assert p.requires_grad and p.grad is None


@pytest.mark.parametrize("mode", ["auto", "pinned", "device"])
def test_fetch_stages_every_changed_tensor_exactly(store: Store, mode: Staging) -> None:
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 1.5 for k, v in model.state_dict().items()}
    state["scale"] = model.scale.clone()  # unchanged: not fetched
    v = commit_raw(store, state)
    m = store.manifest(v)
    staged, reasons = prepare(
        store.blobs,
        m,
        live,
        live.digests(),
        Policy(),
        mode=mode,
        where="model 'm' v1",
    )
    assert reasons == {}
    assert "scale" not in staged.tensors and len(staged.tensors) == 9
    assert staged.bytes_fetched == sum(t.nbytes for k, t in state.items() if k != "scale")
    for name, t in staged.tensors.items():
        assert torch.equal(t, state[name]) and t.device.type == "cpu"
    ptrs = {k: t.data_ptr() for k, t in model.state_dict().items()}
    apply(pairs(staged, live))
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == ptrs
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_fetch_names_every_corrupted_or_missing_tensor(store: Store, client: redis.Redis) -> None:
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 2 for k, v in model.state_dict().items()}
    v = commit_raw(store, state)
    m = store.manifest(v)
    by = m.by_name()
    bad, gone = by["layers.0.weight"], by["layers.2.bias"]
    first = keys.blob_key("hotswap", "m", bad.digest, bad.chunk_bytes, 0)
    raw = bytearray(cast(bytes, client.get(first)))
    raw[0] ^= 0xFF
    client.set(first, bytes(raw))
    client.delete(keys.blob_key("hotswap", "m", gone.digest, gone.chunk_bytes, 0))
    p = plan(m, live, live.digests(), set())
    staged = fetch(store.blobs, p, live, mode="auto", where="model 'm' v1")
    assert sorted(staged.failures) == ["layers.0.weight", "layers.2.bias"]
    assert staged.failures["layers.0.weight"][0].startswith(
        "model 'm' v1 tensor 'layers.0.weight': bytes hash to"
    )
    assert "chunk 0 of 1 is missing" in staged.failures["layers.2.bias"][0]
    assert "layers.0.weight" not in staged.tensors and len(staged.tensors) == 8


# -- host arenas --------------------------------------------------------------------


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_fetch_lands_in_one_arena_that_a_kept_budget_reuses(store: Store) -> None:
    model = Ten()
    live = LiveModel(model)
    memory = HostMemory(keep_bytes=1 << 20)
    first = {k: v.detach() * 1.5 for k, v in model.state_dict().items()}
    m1 = store.manifest(commit_raw(store, first))
    staged = fetch(
        store.blobs,
        plan(m1, live, live.digests(), set()),
        live,
        mode="auto",
        where="w",
        memory=memory,
    )
    assert staged.failures == {} and len(staged.tensors) == 10
    assert staged.arena is not None
    arena = _storage(staged.arena)
    assert {_storage(t) for t in staged.tensors.values()} == {arena}
    assert all(t.data_ptr() % ALIGN == 0 for t in staged.tensors.values())
    assert all(torch.equal(t, first[k]) for k, t in staged.tensors.items())
    assert memory.kept_bytes == 0  # in use
    staged.release()
    assert staged.tensors == {} and staged.arena is None
    assert memory.kept_bytes == sum(-(-t.nbytes // ALIGN) * ALIGN for t in first.values())
    second = {k: v.detach() * 2.5 for k, v in model.state_dict().items()}
    m2 = store.manifest(commit_raw(store, second))
    again = fetch(
        store.blobs,
        plan(m2, live, live.digests(), set()),
        live,
        mode="auto",
        where="w",
        memory=memory,
    )
    assert again.arena is not None and _storage(again.arena) == arena  # the same memory
    assert all(torch.equal(t, second[k]) for k, t in again.tensors.items())
    assert memory.kept_bytes == 0


def test_without_a_budget_nothing_is_kept(store: Store) -> None:
    model = Ten()
    live = LiveModel(model)
    memory = HostMemory()
    m = store.manifest(
        commit_raw(store, {k: v.detach() + 1 for k, v in model.state_dict().items()})
    )
    staged = fetch(
        store.blobs,
        plan(m, live, live.digests(), set()),
        live,
        mode="auto",
        where="w",
        memory=memory,
    )
    assert staged.arena is not None
    staged.release()
    assert memory.kept_bytes == 0


def test_host_memory_keeps_the_largest_arena_within_budget() -> None:
    memory = HostMemory(keep_bytes=1000)
    small, big, huge = (torch.empty(n, dtype=torch.uint8) for n in (100, 900, 2000))
    memory.give(small)
    memory.give(big)
    memory.give(huge)  # over the budget: dropped
    assert memory.kept_bytes == 900
    assert memory.take(500) is big and memory.kept_bytes == 0
    memory.give(big)
    fresh = memory.take(950)  # too small: dropped, a new one is made
    assert fresh.numel() == 950 and memory.kept_bytes == 0
    with pytest.raises(ConfigError, match="staging keep_bytes must be >= 0, not -1"):
        HostMemory(-1)


def _lazy_free_mib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("LazyFree:"):
                return int(line.split()[1]) // 1024
    return 0


@pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps_rollup"), reason="LazyFree shows in Linux smaps"
)
def test_a_kept_arena_is_lazily_freed_at_rest_and_whole_again_when_taken() -> None:
    size = 32 * 1024 * 1024
    memory = HostMemory(keep_bytes=size)
    arena = memory.take(size)
    arena.fill_(7)
    before = _lazy_free_mib()
    memory.give(arena)
    # At rest the kernel may take the pages back under pressure.
    assert _lazy_free_mib() - before >= 30
    again = memory.take(size)
    assert again is arena
    assert _lazy_free_mib() - before <= 1  # taken: faulted in and no longer reclaimable
    again.fill_(3)
    assert int(again[::4096].eq(3).all()) == 1
    memory.give(again, used=size)
    # A small version takes back, and later frees, only the part it writes.
    small = memory.take(4 * 1024 * 1024)
    assert small is arena
    assert 26 <= _lazy_free_mib() - before <= 29
    small[: 4 * 1024 * 1024].fill_(5)
    memory.give(small, used=4 * 1024 * 1024)
    assert _lazy_free_mib() - before >= 30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mappings: Linux")
def test_fresh_arena_is_faulted_in_and_writable() -> None:
    size = 64 * 1024 * 1024
    before = _rss()
    arena = anonymous(size)
    grew = _rss() - before
    assert arena.numel() == size and arena.dtype == torch.uint8
    assert arena.data_ptr() % 4096 == 0
    if populate(arena):
        assert grew >= size * 0.9  # resident before anything was written
    arena[-4:] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert arena[-4:].tolist() == [1, 2, 3, 4] and int(arena[:4096].sum()) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mappings: Linux")
def test_fresh_arena_is_faulted_in_behind_its_first_writes() -> None:
    size = 64 * 1024 * 1024
    before = _rss()
    arena = anonymous(size, fill_behind=True)
    assert _rss() - before < size * 0.1  # handed out before any page is in
    arena[:4] = torch.tensor([9, 8, 7, 6], dtype=torch.uint8)  # the fetch starts at once
    filling = populate_behind(arena)
    assert filling is not None
    filling.join()
    assert _rss() - before >= size * 0.9
    assert arena[:4].tolist() == [9, 8, 7, 6] and int(arena[4:].sum()) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous mappings: Linux")
def test_host_memory_waits_for_the_filling_thread_before_taking_an_arena_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 64 * 1024 * 1024
    done: list[int] = []
    waited = threading.Event()  # someone began waiting for the filling thread
    real, real_behind = hostmem.populate, hostmem.populate_behind

    def held(buf: torch.Tensor) -> bool:
        # A kernel still busy faulting in a large arena: busy until give() waits
        # for it, so a give() that did not wait returns before it is done.
        waited.wait(10)
        ok = real(buf)
        done.append(buf.numel())
        return ok

    class Watched:
        """The filling thread, noting when someone starts waiting for it."""

        def __init__(self, thread: threading.Thread) -> None:
            self.thread = thread

        def join(self, timeout: float | None = None) -> None:
            waited.set()
            self.thread.join(timeout)

    def behind(buf: torch.Tensor) -> Watched | None:
        thread = real_behind(buf)
        return None if thread is None else Watched(thread)

    monkeypatch.setattr(hostmem, "populate", held)
    monkeypatch.setattr(hostmem, "populate_behind", behind)
    memory = HostMemory(keep_bytes=size)
    arena = memory.take(size)
    assert list(memory._filling) == [arena.data_ptr()] and done == []
    arena[: 1024 * 1024].fill_(1)
    memory.give(arena, used=1024 * 1024)
    # Advised free only once the thread was done: no page it faults in later is kept.
    assert done == [size]
    assert memory._filling == {} and memory.kept_bytes == size
    assert memory.take(size) is arena and memory._filling == {}  # kept: nothing to fill


def test_a_fetch_that_fails_hands_its_arena_back(store: Store) -> None:
    model = Ten()
    live = LiveModel(model)
    memory = HostMemory(keep_bytes=1 << 20)
    m = store.manifest(
        commit_raw(store, {k: v.detach() + 1 for k, v in model.state_dict().items()})
    )
    calls = [0]

    class Dying:
        def read_into(
            self,
            entry: mf.TensorEntry,
            out: memoryview,
            version: int | None = None,
            on_chunk: Callable[[int, int], None] | None = None,
        ) -> None:
            calls[0] += 1
            if calls[0] == 3:
                raise StoreUnavailable("Redis unreachable while reading tensor")
            store.blobs.read_into(entry, out, version, on_chunk)

        def stream(self, entry: mf.TensorEntry, version: int | None = None) -> Iterator[memoryview]:
            return store.blobs.stream(entry, version)

        def frames(self, entry: mf.TensorEntry, version: int | None = None) -> Iterator[memoryview]:
            return store.blobs.frames(entry, version)

    with pytest.raises(StoreUnavailable, match="Redis unreachable while reading tensor"):
        fetch(
            Dying(),
            plan(m, live, live.digests(), set()),
            live,
            mode="auto",
            where="w",
            memory=memory,
        )
    assert memory.kept_bytes > 0 and calls[0] == 3


# -- metadata checks and known norms --------------------------------------------------


def _spoiled(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shape = dict(base, **{"emb.weight": torch.zeros(9, 4)})
    dtype = dict(base, **{"out.weight": base["out.weight"].double()})
    unknown = dict(base, extra=torch.ones(2))
    split = dict(base, **{"out.weight": base["emb.weight"] + 1})
    return [base, shape, dtype, unknown, split]


@pytest.mark.parametrize("unknown", ["reject", "ignore"])
def test_metadata_fast_path_agrees_with_checking_every_entry(unknown: str) -> None:
    model = Tied()
    live = LiveModel(model)
    policy = Policy(unknown_tensors=unknown)  # type: ignore[arg-type]
    found = []
    for state in _spoiled(model):
        m = manifest_of(state)
        fast = check_metadata(m, live, policy)
        assert fast == validate.check_entries(m.tensors, live.tensors, live.ties(), policy)
        found.append(fast)
    assert found[0] == ({}, set())
    assert all(f != found[0] for f in found[1:])


def test_metadata_names_live_tensors_the_version_leaves_out() -> None:
    model = Tied()
    live = LiveModel(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The tied "out.weight" is covered by "emb.weight"; an empty tensor holds no bytes.
    lean = {k: v for k, v in state.items() if k not in ("out.weight", "empty_b")}
    assert check_metadata(manifest_of(lean), live, Policy()) == ({}, set())
    no_emb = {k: v for k, v in state.items() if k not in ("emb.weight", "out.weight")}
    reasons, _ = check_metadata(manifest_of(no_emb), live, Policy())
    assert reasons == {"emb.weight": [validate.MISSING], "out.weight": [validate.MISSING]}
    assert check_metadata(manifest_of(no_emb), live, Policy(missing_tensors="keep")) == (
        {},
        set(),
    )


def test_a_known_old_norm_is_used_instead_of_a_pass_over_the_live_tensor(store: Store) -> None:
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 1.01 for k, v in model.state_dict().items()}
    m = store.manifest(commit_raw(store, state))
    real = codec.norm(live.tensors["layers.0.weight"])
    staged, reasons = prepare(
        store.blobs,
        m,
        live,
        live.digests(),
        Policy(),
        mode="auto",
        where="w",
        old_norms={"layers.0.weight": real / 1000},
    )
    assert list(reasons) == ["layers.0.weight"]
    (why,) = reasons["layers.0.weight"]
    assert why.startswith("norm ratio new/old ") and f"(norm {real / 1000:.6g} -> " in why
    # Every norm the validation checked against the bytes is handed on.
    entries = m.by_name()
    assert staged.norms == {k: entries[k].norm for k in state if k != "layers.0.weight"}
    staged.release()
    staged, reasons = prepare(
        store.blobs, m, live, live.digests(), Policy(check_norm=False), mode="auto", where="w"
    )
    assert reasons == {} and staged.norms == {}


def test_per_tensor_host_buffers_of_cuda_models_run_on_cpu_too(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA models stage each tensor in its own pinned buffer; on a CPU-only
    # machine the same branch runs with plain memory once arenas are off.
    monkeypatch.setattr(staging, "_in_arena", lambda device, mode: False)
    made: list[tuple[int, bool]] = []
    real = staging._host_buffer

    def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
        made.append((nbytes, pin))
        return real(nbytes, pin)

    monkeypatch.setattr(staging, "_host_buffer", host_buffer)
    model = Ten()
    live = LiveModel(model)
    state = {k: v.detach() * 3 for k, v in model.state_dict().items()}
    m = store.manifest(commit_raw(store, state))
    staged, reasons = prepare(
        store.blobs, m, live, live.digests(), Policy(), mode="pinned", where="w"
    )
    assert reasons == {} and staged.arena is None
    assert sorted(made) == sorted((t.nbytes, False) for t in state.values())
    apply(pairs(staged, live))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


@pytest.mark.parametrize("mode", ["auto", "pinned", "device"])
@pytest.mark.parametrize("arena", [True, False])
def test_an_allowed_cast_is_staged_converted_in_every_staging_mode(
    store: Store, mode: Staging, arena: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not arena:  # per-tensor host buffers, as CUDA models take
        monkeypatch.setattr(staging, "_in_arena", lambda device, mode: False)
    model = Tied().to(torch.bfloat16)
    live = LiveModel(model)
    state = {k: v.detach().float() * 1.5 for k, v in model.state_dict().items()}
    m = store.manifest(commit_raw(store, state))
    policy = Policy(cast=[("F32", "BF16")])
    staged, reasons = prepare(store.blobs, m, live, live.digests(), policy, mode=mode, where="w")
    assert reasons == {}
    # The digest was checked over the fp32 bytes; the tied pair is staged (and cast) once.
    assert staged.bytes_fetched == state["emb.weight"].nbytes
    assert list(staged.tensors) == ["emb.weight"]
    assert staged.tensors["emb.weight"].dtype == torch.bfloat16
    assert staged.norms == {}  # the manifest's norm is the fp32 values', not the cast's
    apply(pairs(staged, live))
    staged.release()
    assert torch.equal(model.emb.weight, state["emb.weight"].bfloat16())
    assert model.out.weight is model.emb.weight
