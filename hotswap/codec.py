"""Tensors to raw little-endian bytes and back, with digests and stats.

Pure: imports no Redis. A tensor travels as its C-contiguous bytes, split
into chunks of at most ``chunk_bytes``; its dtype and shape travel in the
manifest under the names of ``DTYPES``. Those names and their widths are
also in ``hotswap.dtypes``, for readers that must not import torch; this
module refuses to import if the two tables disagree.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import blake3
import torch

from hotswap import dtypes, priority
from hotswap.errors import FormatError, IntegrityError, SourceError

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("hotswap needs a little-endian machine: blobs are little-endian bytes")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C128": torch.complex128,
    "C64": torch.complex64,
    "C32": torch.complex32,
}
# Newer dtypes only where this torch has them, as safetensors does.
_NEWER = [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F4_E2M1_X2", "float4_e2m1fn_x2"),
]
for _name, _attr in _NEWER:
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


def _disagreements(
    table: Mapping[str, torch.dtype], optional: Iterable[str], wire: Mapping[str, dtypes.WireDtype]
) -> list[str]:
    """How ``table`` differs from the torch-free ``wire`` table; ``optional``
    names may be missing from ``table`` (this torch lacks them)."""
    known = set(table) | set(optional)
    problems = [f"{n} is not in hotswap.dtypes" for n in sorted(known - set(wire))]
    problems += [f"{n} is missing here" for n in sorted(set(wire) - known)]
    problems += [
        f"{n} is {table[n].itemsize} bytes here, {wire[n].itemsize} in hotswap.dtypes"
        for n in sorted(set(table) & set(wire))
        if table[n].itemsize != wire[n].itemsize
    ]
    return problems


# Manifests are checked against hotswap.dtypes, tensors built from this table:
# a name or width in one and not the other would pass one check and fail later.
if _drift := _disagreements(DTYPES, [n for n, _ in _NEWER], dtypes.DTYPES):
    raise ImportError(f"hotswap.codec and hotswap.dtypes disagree: {'; '.join(_drift)}")

# Defined in hotswap.dtypes (manifests need them without torch), kept here for callers.
DIGEST_HEX_LEN = dtypes.DIGEST_HEX_LEN
chunk_count = dtypes.chunk_count

_PACKED = {DTYPES[n] for n in ("F4_E2M1_X2",) if n in DTYPES}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; SourceError if it cannot travel."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise SourceError(
            f"dtype {dtype} is not supported: convert the tensor to one of "
            f"{', '.join(sorted(DTYPES))}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a wire name; FormatError for an unknown name."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} (this torch knows {len(DTYPES)})") from None


def itemsize(name: str) -> int:
    return dtype_from_name(name).itemsize


def chunk_spans(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each chunk of a buffer of ``nbytes``."""
    return [(s, min(s + chunk_bytes, nbytes)) for s in range(0, nbytes, chunk_bytes)]


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a flat memoryview, copying only if needed.

    Non-contiguous or non-CPU tensors are copied once into a contiguous CPU
    tensor; the view keeps that memory alive.
    """
    t = tensor.detach()
    if t.dtype not in _NAMES:
        dtype_name(t.dtype)
    if t.device.type != "cpu":
        t = t.to("cpu")
    # Lazy conjugate/negative views must be materialised: their memory holds
    # the un-negated values and torch refuses to reinterpret them as bytes.
    t = t.resolve_conj().resolve_neg()
    same_width = _SAME_WIDTH_INT.get(t.dtype.itemsize)
    if same_width is not None and not t.is_contiguous():
        # Copy as integers of the same width: bit-exact for every dtype, and
        # free of the kernels (and warnings) some dtypes such as C32 lack.
        t = t.view(same_width)
    t = t.contiguous()
    if not t.numel():
        return memoryview(bytearray())
    # A contiguous tensor of one element may keep any stride (say, t[::2] of
    # two elements), which view(uint8) refuses; as_strided pins it to 1.
    flat = t.reshape(-1).as_strided((t.numel(),), (1,)).view(torch.uint8)
    array: Any = flat.numpy()
    return memoryview(array).cast("B")


def from_bytes(
    buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """A CPU tensor over ``buf`` (shared memory when ``buf`` is writable)."""
    torch_dtype = dtype_from_name(dtype)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(
            f"shape {list(shape)!r:.200} of a {dtype} tensor has a negative dimension"
        )
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(buf) != expected:
        raise FormatError(
            f"{len(buf)} bytes cannot hold a {dtype} tensor of shape {list(shape)} "
            f"({expected} bytes)"
        )
    try:
        if expected == 0:
            # A view, not torch.empty: allocating some dtypes (C32) warns.
            return torch.empty(0, dtype=torch.uint8).view(torch_dtype).reshape(shape)
        if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
            # torch.frombuffer warns on read-only memory and would let writes through.
            buf = bytearray(buf)
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        return raw.view(torch_dtype).reshape(shape)
    except RuntimeError as e:
        # An empty shape whose other dimensions overflow int64 (torch counts them all).
        raise FormatError(f"a {dtype} tensor of shape {list(shape)} cannot exist: {e}") from e


# Buffers from this size are hashed on every core: past it BLAKE3's threads
# pay for themselves (docs/performance.md, "BLAKE3 threads"); a model's
# matrices are mostly a few hundred KiB to a few MiB.
THREADED_DIGEST_BYTES = 256 * 1024


def digest(buf: bytes | bytearray | memoryview) -> str:
    """BLAKE3 of the bytes, as 64 hex characters (threads for large buffers)."""
    threads = priority.hash_threads() if len(buf) >= THREADED_DIGEST_BYTES else 1
    return blake3.blake3(buf, max_threads=threads).hexdigest()


class ChunkDigest:
    """BLAKE3 of a buffer that fills chunk by chunk, each chunk hashed as soon as
    every chunk before it has landed, while later ones are still on the wire.

    One thread: the transfer leaves the client's core idle part of the time,
    and hashing in those gaps finishes sooner than hashing the whole buffer
    afterwards on two threads (figures in docs/performance.md).
    Call ``landed(i, length)`` once chunk ``i`` is in place. A chunk that lands
    again after it was hashed (a retried read) makes ``hexdigest`` hash the
    whole buffer again: the bytes hashed may since have been overwritten.
    """

    def __init__(self, buf: memoryview, chunk_bytes: int, *, threads: bool = False) -> None:
        self._buf = buf
        self._chunk = chunk_bytes
        # ``threads``: every core hashes each chunk, for callers whose chunks come
        # from the CPU (a delta's decode), not from the wire.
        self._hasher = blake3.blake3(max_threads=priority.hash_threads() if threads else 1)
        self._waiting: set[int] = set()
        self._next = 0
        self._again = False

    def landed(self, index: int, length: int = 0) -> None:
        if index < self._next:
            self._again = True
        if self._again:
            return
        self._waiting.add(index)
        while self._next in self._waiting:
            self._waiting.discard(self._next)
            start = self._next * self._chunk
            self._hasher.update(self._buf[start : start + self._chunk])
            self._next += 1

    def hexdigest(self) -> str:
        """The digest of the whole buffer as it is now."""
        hashed = self._next * self._chunk
        if self._again or hashed == 0:
            return digest(self._buf)
        if hashed < len(self._buf):
            self._hasher.update(self._buf[hashed:])
        return str(self._hasher.hexdigest())


def check_digest(
    entry_name: str, data: bytes | bytearray | memoryview, expected: str, where: str
) -> None:
    """Raise IntegrityError unless ``data`` hashes to ``expected``.

    ``where`` names the model and version, e.g. ``"model 'm' v3"``.
    """
    check_hexdigest(entry_name, digest(data), expected, where)


def check_hexdigest(entry_name: str, actual: str, expected: str, where: str) -> None:
    """Raise IntegrityError unless the digest ``actual`` is ``expected``."""
    if actual != expected:
        raise IntegrityError(
            f"{where} tensor {entry_name!r}: bytes hash to {actual[:16]}..., the manifest says "
            f"{expected[:16]}... (corrupted in Redis or in transit); run `hotswap verify` "
            "and publish again"
        )


@dataclass(frozen=True)
class Stats:
    """L2 norm and largest magnitude; a non-finite value makes both non-finite."""

    norm: float
    max_abs: float


# Elements per block when squares are summed through a float64 buffer: 4 MiB,
# allocated once per call and reused. A fresh block per step (``.to(float64)``)
# costs more than the arithmetic: every block is new pages from the kernel.
BLOCK = 1 << 19
# Half floats convert to float64 faster through float32 than directly;
# bfloat16 converts faster directly (figures in docs/performance.md).
_VIA_FLOAT32 = {torch.float16}
# dtypes whose ``torch.aminmax`` runs in place, on the tensor's own dtype.
_AMINMAX = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}


def stats(tensor: torch.Tensor) -> Stats:
    """Norm and max-abs of a tensor, computed the same way everywhere.

    Squares are summed in float64 (agreeing with an exact float64 norm to
    ~1e-15), never over a copy of more than ``BLOCK`` elements. NaN anywhere
    makes both figures NaN; an infinity makes the norm infinite. Complex
    tensors give the norm and largest modulus; integers and booleans their
    values; packed 4-bit floats the values of their bytes.
    """
    t = tensor.detach()
    if t.numel() == 0:
        return Stats(0.0, 0.0)
    x, pairs = _real(t)
    if not pairs and x.dtype in _AMINMAX:
        lo, hi = torch.aminmax(x)
        max_abs = max(abs(float(lo)), abs(float(hi)))
        if math.isnan(float(lo)) or math.isnan(float(hi)):
            return Stats(math.nan, math.nan)
        if math.isinf(max_abs):
            return Stats(math.inf, math.inf)
        total, _ = _squares(x, want_max=False, pairs=False)
    else:
        total, max_abs = _squares(x, want_max=True, pairs=pairs)
    if math.isnan(total) or math.isnan(max_abs):
        return Stats(math.nan, math.nan)
    return Stats(math.sqrt(total), max_abs)


def norm(tensor: torch.Tensor) -> float:
    """The L2 norm exactly as ``stats`` computes it (NaN or inf when a value is)."""
    t = tensor.detach()
    if t.numel() == 0:
        return 0.0
    x, _ = _real(t)
    return math.sqrt(_squares(x, want_max=False, pairs=False)[0])


def _real(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` as real numbers with the same sum of squares, without copying;
    True when they are (real, imaginary) pairs of a complex tensor."""
    if t.dtype in _PACKED:
        # Packed sub-byte floats have no arithmetic in torch; their bytes still
        # give a stable fingerprint (and e2m1 has no NaN or inf to screen).
        t = t.view(torch.uint8)
    if t.is_conj():
        # |conj(z)| = |z|: clearing the lazy bit is a view, resolving it a copy.
        t = t.conj()
    # A lazily negated view (rare) has to be materialised before reading its memory.
    t = _memory_order(t.resolve_neg())
    if t.is_complex():
        # Ordered first, so the (real, imaginary) dimension stays last.
        return torch.view_as_real(t), True
    return t, False


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dimensions permuted into memory order (sums do not care), so a
    transposed tensor reads as dense memory instead of being copied."""
    if t.is_contiguous():
        return t
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: (t.shape[d] != 1, -strides[d]))
    return t.permute(order)


def _pieces(t: torch.Tensor, limit: int) -> Iterator[torch.Tensor]:
    """Sub-tensors of ``t`` of at most ``limit`` elements each, covering it once."""
    if t.numel() <= limit:
        yield t
    elif t.dim() == 1:
        for start in range(0, t.numel(), limit):
            yield t[start : start + limit]
    elif (inner := t[0].numel()) <= limit:
        step = limit // inner
        for start in range(0, t.shape[0], step):
            yield t[start : start + step]
    else:
        for row in t:
            yield from _pieces(row, limit)


def _squares(x: torch.Tensor, *, want_max: bool, pairs: bool) -> tuple[float, float]:
    """(sum of squares in float64, largest magnitude or NaN if not ``want_max``)."""
    flat = x.reshape(-1) if x.is_contiguous() else x
    # Dense float64 needs no conversion: one dot product over the tensor itself.
    direct = x.dtype == torch.float64 and flat.dim() == 1
    total = (
        torch.dot(flat, flat) if direct else torch.zeros((), dtype=torch.float64, device=x.device)
    )
    if direct and not want_max:
        return float(total), math.nan
    size = 0 if direct else min(BLOCK, x.numel())
    wide = torch.empty(size, dtype=torch.float64, device=x.device)
    narrow = (
        torch.empty(size, dtype=torch.float32, device=x.device) if x.dtype in _VIA_FLOAT32 else None
    )
    top = torch.zeros((), dtype=torch.float64, device=x.device)
    # Pairs must not straddle blocks: BLOCK is even and only leading dimensions split.
    for piece in _pieces(flat, BLOCK):
        if direct:
            block = piece
        else:
            block = wide[: piece.numel()]
            if narrow is not None:
                step = narrow[: piece.numel()]
                step.view(piece.shape).copy_(piece)
                block.copy_(step)
            else:
                block.view(piece.shape).copy_(piece)
            total += torch.dot(block, block)
        if want_max:
            if pairs:
                peak = torch.linalg.vector_norm(block.view(-1, 2), dim=1).max()
            else:
                lo, hi = torch.aminmax(block)
                peak = torch.maximum(-lo, hi)
            top = torch.maximum(top, peak)  # NaN propagates
    return float(total), float(top) if want_max else math.nan
