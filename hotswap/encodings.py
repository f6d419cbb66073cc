"""The payload encodings of delta frames: a patch of the few elements that changed, or
the XOR of the whole chunk. Pure: imports no Redis; bytes in, bytes out.

Both encode the XOR of a chunk with its base, so both are symmetric: the
payload that takes the base to the result takes the result back to the base.
Which one a frame uses is chosen per chunk by how many elements changed
(measured in bench/delta_codec.py; docs/performance.md, "Delta encoding"):

* ``SPARSE_ZSTD`` (few changed, as after an RL step in bfloat16): a head
  ``<BI`` (element width in bytes, count of changed elements), then one zstd
  frame, its size declared, of ``count`` uint32 gaps between the changed
  elements' indices (the first counted from 0) and their ``count`` XOR values.
  Decoding copies the base and patches only those elements.
* ``SHUFFLE_ZSTD`` (most changed, elements wider than a byte, as after a
  float32 fine-tune step): a head ``<B`` (element width in bytes), then one
  zstd frame, its size declared, of the whole chunk's XOR with its bytes
  transposed by element (every element's first byte, then every second
  byte, ...): a small step changes the low bytes of every element and
  leaves the high ones (sign, exponent) alone, so the high planes are runs
  of zeros that zstd all but drops.
* ``XOR_ZSTD`` (most changed, one-byte elements; still decoded for any): one
  zstd frame, its size declared, of the whole chunk's XOR.

Every decoder writes at most the chunk's length: a payload whose zstd frame
declares any other size than the one its head implies is refused before it
is decompressed, and decompression stops at the first byte past it.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import zstandard

from hotswap.errors import ConfigError, FormatError

Bytes = npt.NDArray[np.uint8]


class Patched(NamedTuple):
    """Where a sparse patch wrote: word width in bytes, rising word indices in the chunk."""

    width: int
    at: npt.NDArray[np.uint64]


class Encoding(enum.IntEnum):
    """How a frame's payload turns the base chunk into the result chunk (the frame's id)."""

    XOR_ZSTD = 1
    SPARSE_ZSTD = 2
    SHUFFLE_ZSTD = 3

    @property
    def wire_name(self) -> str:
        """The name a manifest uses for this encoding."""
        return _WIRE_NAMES[self]


_WIRE_NAMES = {
    Encoding.XOR_ZSTD: "xor-zstd",
    Encoding.SPARSE_ZSTD: "sparse-zstd",
    Encoding.SHUFFLE_ZSTD: "shuffle-zstd",
}
# zstd's fastest regular level: higher levels cost encode time and save
# almost nothing on XOR deltas (docs/performance.md, "Delta encoding").
ZSTD_LEVEL = 1
# A chunk whose changed elements are at most this fraction of its elements is
# patched (SPARSE_ZSTD), any other XORed whole (XOR_ZSTD): below it the patch
# is smaller and faster both ways, and its index and values (4 bytes plus
# the element a change) always fit within the chunk's own size.
SPARSE_MAX_FRACTION = 0.125
_SPARSE_HEAD = struct.Struct("<BI")
_SHUFFLE_HEAD = struct.Struct("<B")
_WIDTHS: dict[int, type[np.unsignedinteger]] = {
    1: np.uint8,
    2: np.uint16,
    4: np.uint32,
    8: np.uint64,
}


def encoding_from_name(name: str) -> Encoding:
    """The encoding a manifest names; FormatError for one this hotswap does not know.

    Example::

        encodings.encoding_from_name("xor-zstd")  # Encoding.XOR_ZSTD
    """
    for encoding, wire in _WIRE_NAMES.items():
        if wire == name:
            return encoding
    raise FormatError(
        f"unknown delta encoding {name!r:.40} (this hotswap knows "
        f"{', '.join(sorted(_WIRE_NAMES.values()))}); upgrade hotswap"
    )


def known(encoding_id: int) -> bool:
    """Whether a frame's encoding id is one this hotswap decodes."""
    return encoding_id in {int(e) for e in _WIRE_NAMES}


def element_width(itemsize: int, length: int) -> int:
    """The widest of 8, 4, 2, 1 bytes dividing both the element and the chunk.

    A patch indexes whole elements (or, for 16-byte complex numbers and
    chunks cut mid-element, the widest word that tiles both).
    """
    return next(w for w in (8, 4, 2, 1) if itemsize % w == 0 and length % w == 0)


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe, and building one per frame costs
    # more than a small frame's work: one per thread, reused.
    found = getattr(_local, "compressor", None)
    if found is None:
        found = _local.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=False
        )
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def encode(
    new: Bytes, base: Bytes, itemsize: int, encoding: Encoding | None = None
) -> tuple[Encoding, bytes]:
    """The payload taking ``base`` to ``new`` (same length), and its encoding.

    Args:
        new, base: one chunk of the result and of the base, as uint8 arrays.
        itemsize: the tensor's element size in bytes (a patch indexes elements).
        encoding: force one; None chooses by ``SPARSE_MAX_FRACTION`` (a patch),
            else ``SHUFFLE_ZSTD`` for elements wider than a byte, else ``XOR_ZSTD``.

    Raises:
        ConfigError: ``SPARSE_ZSTD`` forced on a chunk where too much changed
            for a patch to fit within its size.
    """
    xor = np.bitwise_xor(new, base)
    width = element_width(itemsize, len(xor))
    words = xor.view(_WIDTHS[width])
    changed = words != 0
    count = int(np.count_nonzero(changed))
    if encoding is None:
        if count <= SPARSE_MAX_FRACTION * words.size:
            encoding = Encoding.SPARSE_ZSTD
        else:
            encoding = Encoding.SHUFFLE_ZSTD if width > 1 else Encoding.XOR_ZSTD
    if encoding is Encoding.XOR_ZSTD:
        return encoding, _compressor().compress(xor.data)
    if encoding is Encoding.SHUFFLE_ZSTD:
        planes = _shuffle(xor, width)
        return encoding, _SHUFFLE_HEAD.pack(width) + _compressor().compress(planes.data)
    if count * (4 + width) > len(xor):
        raise ConfigError(
            f"delta frame: {count} changed elements of {width} bytes do not fit a sparse "
            f"patch of a {len(xor)}-byte chunk"
        )
    # nonzero over a boolean mask: much faster than over the integers.
    at = np.flatnonzero(changed)
    gaps = np.diff(at, prepend=0).astype(np.uint32)
    body = gaps.tobytes() + words[at].tobytes()
    return encoding, _SPARSE_HEAD.pack(width, count) + _compressor().compress(body)


def decode(
    encoding: Encoding, payload: memoryview, base: Bytes, out: Bytes, where: str
) -> Patched | None:
    """Write into ``out`` the chunk ``payload`` makes of ``base`` (both ``len(out)``).

    ``out`` may be ``base``'s own memory. Raises FormatError for a payload
    that does not decode to exactly what its encoding implies. Returns, for a
    sparse patch, the only words ``out`` may differ from ``base`` in
    (``hotswap.patches``); None for the other encodings.
    """
    if encoding is Encoding.XOR_ZSTD:
        np.bitwise_xor(_expand(payload, len(out), where), base, out=out)
        return None
    if encoding is Encoding.SHUFFLE_ZSTD:
        _unshuffle(payload, base, out, where)
        return None
    return _patch(payload, base, out, where)


def _width(width: int, length: int, where: str) -> None:
    if width not in _WIDTHS or length % width:
        raise FormatError(f"{where}: element width {width} does not tile {length} bytes")


def _words(data: Bytes, width: int) -> npt.NDArray[np.unsignedinteger]:
    """``data`` as little-endian words of ``width`` bytes: byte k of an element in
    memory is bits 8k to 8k+7 of its word, on any host."""
    words: npt.NDArray[np.unsignedinteger] = data.view(np.dtype(_WIDTHS[width]).newbyteorder("<"))
    return words


def _shuffle(xor: Bytes, width: int) -> Bytes:
    """The chunk's bytes by plane: every element's byte 0, then every byte 1, ...

    By shifts of whole words and a narrowing copy: contiguous passes, much
    faster than numpy's strided transpose of the bytes.
    """
    words = _words(xor, width)
    planes: Bytes = np.empty((width, words.size), dtype=np.uint8)
    shifted = np.empty_like(words)
    for k in range(width):
        np.right_shift(words, 8 * k, out=shifted)
        planes[k] = shifted  # keeps the low byte
    return planes


def _unshuffle(payload: memoryview, base: Bytes, out: Bytes, where: str) -> None:
    """XOR the payload's byte planes, put back in element order, into ``base``."""
    if len(payload) < _SHUFFLE_HEAD.size:
        raise FormatError(f"{where}: shuffled payload of {len(payload)} bytes has no head")
    (width,) = _SHUFFLE_HEAD.unpack_from(payload)
    _width(width, len(out), where)
    planes = _expand(payload[_SHUFFLE_HEAD.size :], len(out), where).reshape(width, -1)
    # Each plane widened and shifted into place, XORed into the base's words:
    # contiguous passes, and in place too (``out`` may be ``base``).
    np.copyto(out, base)
    words = _words(out, width)
    shifted = np.empty_like(words)
    for k in range(width):
        np.copyto(shifted, planes[k])
        np.left_shift(shifted, 8 * k, out=shifted)
        np.bitwise_xor(words, shifted, out=words)


class SparseChange(NamedTuple):
    """A sparse payload read: word width, rising word indices, the words' XOR values."""

    width: int
    at: npt.NDArray[np.uint64]
    xor: npt.NDArray[np.unsignedinteger]


def sparse_count(payload: memoryview) -> int | None:
    """How many elements a ``SPARSE_ZSTD`` payload changes, from its head alone (None:
    no head)."""
    if len(payload) < _SPARSE_HEAD.size:
        return None
    return int(_SPARSE_HEAD.unpack_from(payload)[1])


def sparse_change(payload: memoryview, length: int, where: str) -> SparseChange:
    """What a ``SPARSE_ZSTD`` payload of a ``length``-byte chunk changes, checked as
    decoding checks it.

    Raises:
        FormatError: the payload is malformed, or its indices do not rise within the chunk.
    """
    if len(payload) < _SPARSE_HEAD.size:
        raise FormatError(f"{where}: sparse payload of {len(payload)} bytes has no head")
    width, count = _SPARSE_HEAD.unpack_from(payload)
    _width(width, length, where)
    size = count * (4 + width)
    if size > length:
        raise FormatError(
            f"{where}: {count} changed elements of {width} bytes do not fit {length} bytes"
        )
    raw = _expand(payload[_SPARSE_HEAD.size :], size, where)
    gaps = raw[: 4 * count].view(np.uint32)
    at = np.cumsum(gaps, dtype=np.uint64)
    # Indices must rise strictly and stay inside the chunk: numpy would raise
    # on one past the end, and a repeated index would be patched only once.
    if count and (int(at[-1]) >= length // width or not gaps[1:].all()):
        raise FormatError(f"{where}: sparse indices do not rise within the chunk")
    return SparseChange(width, at, raw[4 * count :].view(_WIDTHS[width]))


def _patch(payload: memoryview, base: Bytes, out: Bytes, where: str) -> Patched:
    """Copy ``base`` into ``out`` and XOR the payload's values in at its indices."""
    change = sparse_change(payload, len(out), where)
    np.copyto(out, base)
    out.view(_WIDTHS[change.width])[change.at] ^= change.xor
    return Patched(change.width, change.at)


def _expand(payload: memoryview, length: int, where: str) -> Bytes:
    """A zstd frame decompressed to exactly ``length`` bytes, never more."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: payload is not a zstd frame ({e})") from e
    # zstd sizes its output buffer from the frame's own header: believing a
    # header larger than the chunk would let a few bytes allocate gigabytes.
    if declared != length:
        said = "no size" if declared < 0 else f"{declared} bytes"
        raise FormatError(f"{where}: payload declares {said}, expected {length} bytes")
    try:
        # One pass into a buffer of exactly ``length``: zstd stops with an
        # error at the first byte past it, and checks the frame is complete.
        raw = _decompressor().decompress(payload, max_output_size=length, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: payload does not decode to {length} bytes ({e})") from e
    if len(raw) != length:
        raise FormatError(f"{where}: payload decodes to {len(raw)} bytes, not {length}")
    array: Bytes = np.frombuffer(raw, dtype=np.uint8)
    return array
