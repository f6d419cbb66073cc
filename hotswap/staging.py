"""From a manifest to new bytes in the live tensors: plan, stage, apply.

``LiveModel`` (``hotswap.live``) names the tensors a process serves and which
of them share storage. ``plan`` picks the tensors whose digest differs from
what runs. ``fetch`` reads them into staging buffers and checks every digest
(a tensor stored as a delta is reconstructed there, ``hotswap.reconstruct``,
against the live bytes when they are the delta's base): for host
staging of CPU models, slices of one arena per version (fresh memory faulted
in with one call, or the previous version's arena, already faulted in, that
``hostmem.HostMemory`` kept up to a byte budget); pinned host memory per tensor for
CUDA models (torch's pinned allocator caches it); device memory with
``staging="device"``. ``apply`` copies staged tensors into the live ones in
place; a tensor a sparse delta took from the live bytes (``hotswap.patches``)
has only its changed elements written. The same code runs on CPU and CUDA:
only the device found at run time differs, so CPU tests exercise every path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hotswap import codec, patches, validate
from hotswap.candidates import History, Manifests, unknown_encoding
from hotswap.copies import to_device
from hotswap.errors import IntegrityError
from hotswap.frames import Blobs
from hotswap.hostmem import HostMemory
from hotswap.live import LiveModel
from hotswap.manifest import Manifest, TensorEntry
from hotswap.metadata import check_metadata, covered_names
from hotswap.prefetch import Prefetched
from hotswap.ranbefore import RanBefore
from hotswap.reconstruct import Rebuild
from hotswap.slice_read import fetch_slice, state_stats
from hotswap.slices import SliceEntry
from hotswap.valuecheck import check_staged

__all__ = [
    "ALIGN",
    "ChunkReader",
    "LiveModel",
    "Plan",
    "Staged",
    "Staging",
    "check_metadata",
    "covered_names",
    "fetch",
    "plan",
    "prepare",
    "staging_device",
    "timed",
    "typed",
]

Staging = Literal["auto", "pinned", "device"]
# Staged tensors start at this alignment inside an arena (any dtype, and
# cache-line aligned for the copies).
ALIGN = 64


# The part of ``BlobStore`` that fetching needs: full blobs, and delta frames.
ChunkReader = Blobs


@dataclass
class Plan:
    """What one version changes: entries to fetch (one per storage) and every changed name."""

    manifest: Manifest
    fetch: list[TensorEntry]
    changed: dict[str, TensorEntry]
    ignored: set[str] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.fetch)


def plan(
    manifest: Manifest, live: LiveModel, digests: Mapping[str, str], ignored: set[str]
) -> Plan:
    """The tensors of ``manifest`` whose bytes differ from what runs now.

    Call after ``validate.check_entries`` passed: names, shapes and dtypes are
    known good, and tied names carry one digest.
    """
    fetch: dict[str, TensorEntry] = {}
    changed: dict[str, TensorEntry] = {}
    for entry in manifest.tensors:
        if entry.name in ignored or digests.get(entry.name) == entry.digest:
            continue
        changed[entry.name] = entry
        fetch.setdefault(live.canonical[entry.name], entry)
    return Plan(manifest, list(fetch.values()), changed, set(ignored))


def staging_device(live: torch.Tensor, mode: Staging) -> torch.device:
    """Where a tensor's new bytes wait: the live device with ``device``, else the host."""
    return live.device if mode == "device" else torch.device("cpu")


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _pin_for(device: torch.device, mode: Staging) -> bool:
    # Pinned pages make host-to-GPU copies asynchronous DMA; a CPU model gains nothing.
    return device.type == "cuda" and torch.cuda.is_available() and mode != "device"


def typed(buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """A staging buffer seen as the entry's dtype and shape (no copy)."""
    dtype = codec.dtype_from_name(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype, device=buf.device)
    return buf.view(dtype).reshape(entry.shape)


@dataclass
class Staged:
    """A fetched version: one typed tensor per storage (by canonical name), ready to apply.

    ``failures`` names the tensors whose bytes could not be fetched or did not
    match their digest; such a version must be rejected.
    """

    plan: Plan
    tensors: dict[str, torch.Tensor]
    failures: dict[str, list[str]]
    bytes_fetched: int
    seconds: float
    validate_seconds: float = 0.0
    # time.monotonic() when the fetch began.
    started: float = 0.0
    # Leading bytes of ``arena`` this version wrote.
    arena_used: int = 0
    # Names whose manifest norm was checked against the fetched bytes.
    norms: dict[str, float] = field(default_factory=dict)
    arena: torch.Tensor | None = None
    memory: HostMemory | None = None
    # Canonical name -> where its staged tensor differs from the live one.
    patches: dict[str, patches.Patch] = field(default_factory=dict)
    # Tensors whose value checks read only their patch (``hotswap.patchcheck``).
    checked_by_patch: int = 0

    def release(self) -> None:
        """Hand the host arena back for the next version; the staged tensors go with it."""
        arena, self.arena = self.arena, None
        self.tensors = {}
        self.patches = {}
        if arena is not None and self.memory is not None:
            self.memory.give(arena, self.arena_used)


def _in_arena(device: torch.device, mode: Staging) -> bool:
    """Whether a live tensor on ``device`` is staged in a host arena."""
    staged_on = device if mode == "device" else torch.device("cpu")
    return staged_on.type == "cpu" and not _pin_for(device, mode)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def fetch(
    reader: ChunkReader,
    p: Plan,
    live: LiveModel,
    *,
    mode: Staging,
    where: str,
    between: Callable[[], None] | None = None,
    memory: HostMemory | None = None,
    digests: Mapping[str, str] | None = None,
    history: Manifests | None = None,
) -> Staged:
    """Read every planned tensor into its staging buffer and check its digest.

    Host staging for a CPU model lands in slices of one arena from ``memory``
    (fresh memory faulted in at once, per version, when none is given). With
    ``mode="device"`` the chunks land in one reusable host buffer, are hashed
    there, then copied once to the device buffer: device memory has no host
    address to read into. A tensor that fails its digest or a chunk check is
    listed in ``failures`` (with the IntegrityError's message naming model,
    version and tensor) and the others are still fetched, so a rejection names
    every bad tensor. ``between`` runs after each tensor (heartbeat, stop).
    Call ``Staged.release()`` once the staged tensors are no longer needed.

    A tensor stored as a delta is reconstructed (``reconstruct.Rebuild``): from
    the live bytes whose digest ``digests`` gives, or full blobs, through the
    deltas that the manifest and, when needed, its older versions (read from
    ``history``) name; the live tensor is only read.
    """
    start, started = time.perf_counter(), time.monotonic()
    memory = memory or HostMemory()
    version = p.manifest.version
    out: dict[str, torch.Tensor] = {}
    failures: dict[str, list[str]] = {}
    offsets: dict[str, int] = {}
    total = 0
    # Decided once per device: this runs between a notice and the first fetch.
    arena_on = {d: _in_arena(d, mode) for d in live.devices()}
    for entry in p.fetch:
        if arena_on[live.tensors[live.canonical[entry.name]].device]:
            offsets[entry.name] = total
            total += _aligned(entry.nbytes)
    arena = memory.take(total) if total else None
    staged = Staged(
        p, out, failures, 0, 0.0, started=started, arena_used=total, arena=arena, memory=memory
    )
    bounce: torch.Tensor | None = None
    # Host-to-device copies of staged bytes go on side streams of their own, so they
    # never wait on the serving stream's kernels nor hold them up (only the apply, under
    # the writer lock, synchronizes with what readers queued).
    side: dict[torch.device, Any] = {}
    older = History(history, p.manifest)
    try:
        plain = [e for e in p.fetch if not isinstance(e, SliceEntry)]
        direct, reader = reader, Prefetched.around(reader, plain, digests or {}, version)
        for entry in p.fetch:
            canon = live.canonical[entry.name]
            target = live.tensors[canon]
            device = staging_device(target, mode)
            offset = offsets.get(entry.name)
            if offset is not None and arena is not None:
                buf = host = arena[offset : offset + entry.nbytes]
            elif device.type == "cpu":
                buf = host = _host_buffer(entry.nbytes, _pin_for(target.device, mode))
            else:
                buf = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
                if bounce is None or bounce.numel() < entry.nbytes:
                    bounce = _host_buffer(max(e.nbytes for e in p.fetch), device.type == "cuda")
                host = bounce[: entry.nbytes]
            array: Any = host.numpy()
            view = memoryview(array).cast("B")
            hashing = codec.ChunkDigest(view, entry.chunk_bytes)
            patch: tuple[str, patches.Where] | None = None
            try:
                if isinstance(entry, SliceEntry):
                    running = (digests or {}).get(entry.name)
                    staged.bytes_fetched += fetch_slice(
                        direct,
                        entry,
                        view,
                        p.manifest,
                        older=older,
                        where=where,
                        live=None if running is None else (running, _bytes(target)),
                    )
                elif entry.delta is not None:
                    running = (digests or {}).get(entry.name)
                    rebuild = Rebuild(reader, p.manifest, entry, history=older, where=where)
                    try:
                        rebuild.into(view, None if running is None else (running, _bytes(target)))
                    finally:
                        staged.bytes_fetched += rebuild.fetched
                    if (
                        running is not None
                        and rebuild.patch is not None
                        and host is buf
                        and entry.name not in live.tied
                        and patches.usable(rebuild.patch, target, entry.dtype, entry.nbytes)
                    ):
                        patch = (running, rebuild.patch)
                else:
                    reader.read_into(entry, view, version, hashing.landed)
                    staged.bytes_fetched += entry.nbytes
                    codec.check_hexdigest(entry.name, hashing.hexdigest(), entry.digest, where)
            except IntegrityError as e:
                failures[entry.name] = [str(e)]
                continue
            if host is not buf:
                to_device(buf, host, side)
            out[canon] = typed(buf, entry)
            if isinstance(entry, SliceEntry):
                state_stats(p.changed, entry, out[canon])
            if patch is not None:
                staged.patches[canon] = patches.make(*patch, out[canon])
            if between is not None:
                between()
    except BaseException:
        staged.release()
        raise
    staged.seconds = time.perf_counter() - start
    return staged


def _bytes(t: torch.Tensor) -> Callable[[], memoryview]:
    """A live tensor's bytes on the host, read when called (a copy only off the CPU)."""
    return lambda: codec.as_bytes(t)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` leaves the seconds taken in ``t[0]``."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def prepare(
    reader: ChunkReader,
    m: Manifest,
    live: LiveModel,
    digests: Mapping[str, str],
    policy: validate.Policy,
    *,
    mode: Staging,
    where: str,
    between: Callable[[], None] | None = None,
    memory: HostMemory | None = None,
    old_norms: Mapping[str, float] | None = None,
    history: Manifests | None = None,
    covered: Iterable[str] = (),
    ran: RanBefore | None = None,
) -> tuple[Staged, dict[str, list[str]]]:
    """Check, fetch and validate one version against what runs: (staged, reasons).

    Tensors whose metadata already fails are not fetched; the others are, so
    that the reasons name every bad tensor. Empty reasons: safe to apply.
    ``old_norms`` gives the norm of a live tensor where it is known (the norm
    of the manifest entry whose bytes it runs), which saves a pass over it.
    A version whose changed tensors use a delta encoding this hotswap does not
    know is refused before anything is fetched. ``history`` serves older
    manifests to tensors stored as deltas (see ``fetch``). ``covered``: live
    names a transform writes (not missing). A tensor whose dtype the policy
    allows to cast is converted after its digest check (``valuecheck``).
    ``ran``: contents this agent ran before, spared the relative checks.
    """
    reasons, ignored = check_metadata(m, live, policy, covered)
    p = plan(m, live, digests, ignored | set(reasons))
    unknown = {n: [no] for n, e in p.changed.items() if (no := unknown_encoding(e, where))}
    if unknown:
        reasons.update(unknown)
        p = Plan(m, [], {}, p.ignored)
    staged = fetch(
        reader,
        p,
        live,
        mode=mode,
        where=where,
        between=between,
        memory=memory,
        digests=digests,
        history=history,
    )
    try:
        for name, why in staged.failures.items():
            reasons.setdefault(name, []).extend(why)
        start = time.perf_counter()
        for name, why in check_staged(staged, live, policy, old_norms or {}, ran).items():
            reasons.setdefault(name, []).extend(why)
        staged.validate_seconds = time.perf_counter() - start
    except BaseException:
        staged.release()
        raise
    return staged, reasons
