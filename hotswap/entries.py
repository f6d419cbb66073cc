"""A tensor's entry in a manifest, and its wire form.

Pure: imports no Redis. An entry says where a tensor's bytes are and what
they must hash to: dtype, shape, size, BLAKE3 digest, chunk size and the
statistics validation compares. Its bytes are stored whole (a *full* blob),
or as a *delta* against another content (``DeltaRef``, issue 14), or both
(a keyframe). Entries are parsed one by one from their own wire bytes, with
every size checked before it is believed, and cached by those bytes
(``EntryCache``) because consecutive versions share most of them.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hotswap import dtypes
from hotswap.errors import FormatError

MAX_NDIM = 64
MAX_NAME_LEN = 1024
MAX_MESSAGE_LEN = 64 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis refuses larger values
# The least a publish cuts (``HotswapSettings.chunk_bytes`` has this floor): a
# declared chunk size below it (unless the tensor is smaller, then one chunk)
# is refused, so a manifest costs at most nbytes / MIN_CHUNK_BYTES + 1 reads
# per tensor, whatever it declares.
MIN_CHUNK_BYTES = 4096
# Per-chunk digests (issue 19): the first bytes of each stored chunk's BLAKE3,
# so that a rank reading a slice verifies the chunks it reads without the
# whole tensor. 16 bytes keep a manifest at 16 bytes per chunk (16 KiB per GiB
# at the default chunk size) with 128-bit second-preimage resistance; an entry
# of more chunks than this carries none (its readers fall back to the whole digest).
CHUNK_DIGEST_BYTES = 16
MAX_CHUNK_DIGESTS = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything a manifest declares is believed."""

    max_manifest_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 100_000
    max_tensor_bytes: int = 64 * 1024**3


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a version: where its bytes are and what they must hash to."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    chunk_bytes: int
    norm: float
    max_abs: float
    # How the bytes are stored besides (or instead of) a full blob; None: full only.
    delta: DeltaRef | None = None
    # CHUNK_DIGEST_BYTES of BLAKE3 per chunk of the content, concatenated in order
    # (None: not stated; written for tensors of two chunks or more). Not part of
    # an entry's identity: the whole digest decides the content.
    chunk_digests: bytes | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def chunks(self) -> int:
        # Cached: blob checks ask every entry of a manifest on each publish.
        return dtypes.chunk_count(self.nbytes, self.chunk_bytes)

    def same_content(self, other: TensorEntry) -> bool:
        return (self.digest, self.dtype, self.shape) == (other.digest, other.dtype, other.shape)


@dataclass(frozen=True)
class DeltaRef:
    """An entry's bytes stored as a delta: frames that turn ``base`` into the entry's content.

    One frame per chunk of the result (``hotswap.delta``), stored as the chunks
    of blob ``blob`` (a digest-shaped name under the usual blob keys, so the
    blob index, gc's grace clock and deletion treat it like any blob). Every
    frame is symmetric (XOR), so the same blob also turns the entry's content
    back into ``base``.
    """

    encodings: tuple[str, ...]  # wire names of the frame encodings used
    base: str  # BLAKE3 digest of the content the delta starts from
    blob: str  # the delta blob's name
    stored_bytes: int  # the frames' lengths added up
    frames_digest: str  # BLAKE3 over the frames' result-chunk digests, in order
    keyframe: bool = False  # the full blob is stored too
    # Links since the last full blob along the chain this delta extends, and
    # their stored bytes: bound a chain (keyframe policy) without reading
    # older manifests. 1 and ``stored_bytes`` for a delta from a full blob.
    depth: int = 1
    chain_bytes: int = 0

    def wire(self) -> list[Any]:
        return [
            list(self.encodings),
            self.base,
            self.blob,
            self.stored_bytes,
            self.frames_digest,
            self.keyframe,
            self.depth,
            self.chain_bytes,
        ]


def entry_wire(t: TensorEntry) -> list[Any]:
    """The entry as its wire array: 8 fields, a 9th for a delta (nil when there is none
    but a 10th follows), a 10th for chunk digests."""
    fields: list[Any] = [
        t.name,
        t.dtype,
        list(t.shape),
        t.nbytes,
        t.digest,
        t.chunk_bytes,
        t.norm,
        t.max_abs,
    ]
    if t.delta is not None or t.chunk_digests is not None:
        fields.append(None if t.delta is None else t.delta.wire())
    if t.chunk_digests is not None:
        fields.append(t.chunk_digests)
    return fields


# msgpack builds an array by first allocating all the slots its header
# declares (up to ~80 KB a level, and 1024 levels nest), so a few KB of nested
# headers would cost tens of MB: every array unpacked here has a small length
# limit. Maps are not preallocated; their limits only refuse junk.
ENTRY_ARRAYS = 2 * MAX_NDIM  # an entry's fields and its shape; a longer shape is a bad shape
MAX_FIELDS = 32
MAX_ENCODINGS = 8  # a delta names the few frame encodings it uses
# A chain longer than this is refused whatever a manifest says (the
# publisher's keyframe policy, ``hotswap.chain.MAX_CHAIN``, stays below it).
MAX_DEPTH = 64
_HEX_DIGEST = re.compile(f"[0-9a-f]{{{dtypes.DIGEST_HEX_LEN}}}")
_ITEMSIZE = {name: dtype.itemsize for name, dtype in dtypes.DTYPES.items()}


def not_msgpack(what: str, e: Exception) -> FormatError:
    return FormatError(f"{what} is not valid msgpack: {type(e).__name__}: {e}")


def unpack(data: bytes, limits: Limits, what: str, max_array_len: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_manifest_bytes,
            max_str_len=max(MAX_MESSAGE_LEN, MAX_NAME_LEN),
            max_array_len=max_array_len,
            max_map_len=MAX_FIELDS,
            max_ext_len=0,
        )
    except Exception as e:
        raise not_msgpack(what, e) from e


class EntryCache:
    """The entries of the last manifest decoded, by their wire bytes.

    Consecutive versions share most entries byte for byte (a delta changes a
    few tensors), and an entry's bytes decide it completely, so ``decode``
    parses and checks only the entries it has not just seen: a delta's
    manifest decodes in a fraction of the time, and that decode sits between
    a notice and the first fetch (docs/performance.md). Holds one manifest's
    entries at most.
    """

    def __init__(self) -> None:
        self._limits: Limits | None = None
        self._entries: dict[bytes, TensorEntry] = {}

    def entries(self, raws: list[bytes], limits: Limits, where: str) -> tuple[TensorEntry, ...]:
        known = self._entries if limits == self._limits else {}
        seen: dict[bytes, TensorEntry] = {}
        for raw in raws:
            entry = known.get(raw)
            if entry is None:
                entry = parse_entry(unpack(raw, limits, where, ENTRY_ARRAYS), where, limits)
            seen[raw] = entry
        self._limits, self._entries = limits, seen
        return tuple(seen.values()) if len(seen) == len(raws) else tuple(seen[r] for r in raws)


def _fail(where: str, problem: str) -> FormatError:
    return FormatError(f"{where}: {problem}")


def _need(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise FormatError(f"{what}: {problem}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dims(shape: list[Any]) -> bool:
    # A plain loop: cheaper than all() over a generator for 1-4 dims, and this
    # runs for every entry of every manifest decoded.
    # msgpack gives exact ints, so ``type(d) is int`` also refuses bools.
    for d in shape:  # noqa: SIM110
        if type(d) is not int or d < 0:
            return False
    return True


def parse_entry(raw: Any, where: str, limits: Limits) -> TensorEntry:
    # Called once per tensor on every manifest read: the checks are cheap and
    # messages are formatted only when one fails (docs/performance.md).
    if type(raw) is not list or len(raw) not in (8, 9, 10):
        raise _fail(where, "tensor entry is not an 8-field array")
    name, dtype, shape, nbytes, digest, chunk_bytes, norm, max_abs = raw[:8]
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
        raise _fail(where, "bad tensor name")
    itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _fail(f"{where} tensor {name!r}", f"unknown dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_NDIM or not _dims(shape):
        raise _fail(f"{where} tensor {name!r}", f"bad shape {shape!r}")
    if type(nbytes) is not int or not 0 <= nbytes <= limits.max_tensor_bytes:
        raise _fail(
            f"{where} tensor {name!r}",
            f"declares {nbytes!r} bytes, limit {limits.max_tensor_bytes}",
        )
    if math.prod(shape) * itemsize != nbytes:
        raise _fail(
            f"{where} tensor {name!r}", f"{nbytes} bytes do not match {dtype} shape {shape}"
        )
    if type(digest) is not str or _HEX_DIGEST.fullmatch(digest) is None:
        raise _fail(f"{where} tensor {name!r}", "bad digest")
    if type(chunk_bytes) is not int or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise _fail(f"{where} tensor {name!r}", f"bad chunk size {chunk_bytes!r}")
    if chunk_bytes < MIN_CHUNK_BYTES and chunk_bytes < nbytes:
        raise _fail(
            f"{where} tensor {name!r}",
            f"chunk size {chunk_bytes} declares {dtypes.chunk_count(nbytes, chunk_bytes)} "
            f"chunks; hotswap cuts chunks of at least {MIN_CHUNK_BYTES} bytes "
            "(one chunk for a smaller tensor)",
        )
    if type(norm) is not float or type(max_abs) is not float:
        raise _fail(f"{where} tensor {name!r}", "stats are not floats")
    delta = None
    if len(raw) >= 9 and (raw[8] is not None or len(raw) == 9):
        delta = _delta(raw[8], f"{where} tensor {name!r}", digest, limits)
    chunk_digests = None
    if len(raw) == 10:
        chunk_digests = _chunk_digests(raw[9], f"{where} tensor {name!r}", nbytes, chunk_bytes)
    return TensorEntry(
        name, dtype, tuple(shape), nbytes, digest, chunk_bytes, norm, max_abs, delta, chunk_digests
    )


def _chunk_digests(raw: Any, where: str, nbytes: int, chunk_bytes: int) -> bytes:
    """Chunk digests as declared: exactly one per chunk, and no more than the bound."""
    count = dtypes.chunk_count(nbytes, chunk_bytes)
    if type(raw) is not bytes or not 0 < count <= MAX_CHUNK_DIGESTS:
        raise _fail(where, f"bad chunk digests for {count} chunks")
    if len(raw) != count * CHUNK_DIGEST_BYTES:
        raise _fail(
            where,
            f"{len(raw)} bytes of chunk digests, {count} chunks need {count * CHUNK_DIGEST_BYTES}",
        )
    return raw


def _delta(raw: Any, where: str, result: str, limits: Limits) -> DeltaRef:
    if type(raw) is not list or len(raw) != 8:
        raise _fail(where, "delta is not an 8-field array")
    encodings, base, blob, stored, frames_digest, keyframe, depth, chain_bytes = raw
    if (
        type(encodings) is not list
        or not 0 < len(encodings) <= MAX_ENCODINGS
        or not all(type(e) is str and 0 < len(e) <= 32 for e in encodings)
    ):
        raise _fail(where, f"bad delta encodings {encodings!r:.80}")
    for what, value in (("base", base), ("blob", blob), ("frames digest", frames_digest)):
        if type(value) is not str or _HEX_DIGEST.fullmatch(value) is None:
            raise _fail(where, f"bad delta {what}")
    if base == result:
        raise _fail(where, "delta from a content to itself")
    stored_cap = limits.max_tensor_bytes
    if type(stored) is not int or not 0 < stored <= stored_cap:
        raise _fail(where, f"delta declares {stored!r} stored bytes")
    if type(keyframe) is not bool:
        raise _fail(where, "bad keyframe flag")
    if type(depth) is not int or not 0 < depth <= MAX_DEPTH:
        raise _fail(where, f"delta chain depth {depth!r} is not 1-{MAX_DEPTH}")
    if type(chain_bytes) is not int or not stored <= chain_bytes <= MAX_DEPTH * stored_cap:
        raise _fail(where, f"delta chain declares {chain_bytes!r} stored bytes")
    return DeltaRef(
        tuple(encodings), base, blob, stored, frames_digest, keyframe, depth, chain_bytes
    )
