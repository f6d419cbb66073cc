"""Delta versions of a tensor: the changed bits, framed per chunk.

Pure: imports no Redis; bytes in, bytes out, like ``hotswap.codec``.

A training step changes most tensors a little: a bfloat16 copy of weights
that took one optimiser step keeps almost every element bit for bit. The
XOR of the new bytes with the parent's is then almost all zero bytes: a
patch of the few changed elements, or the compressed XOR where many
changed (``hotswap.encodings``, chosen per chunk), is a small fraction of
the tensor. XOR is its own inverse, so the delta from P to C also takes C
back to P: a rollback by one step needs no new bytes.

**Frames.** A tensor's delta is one frame per chunk of ``chunk_bytes`` of the
result (the last may be shorter), stored as the delta blob's chunks: chunk
``i`` of the delta blob decodes, against bytes ``[i*chunk_bytes, ...)`` of
the base, to the same bytes of the result. Each frame decodes and verifies
on its own (streaming with bounded memory, and ranks that fetch a slice).
A frame is a fixed header then the payload, little-endian::

    offset size field
    0      3    magic b"HSD"
    3      1    frame format (FORMAT)
    4      1    encoding id (Encoding)
    5      1    flags, 0 (a reader refuses others: room to grow)
    6      4    length of the chunk, in bytes
    10     32   BLAKE3 of the base chunk (the result, read backwards)
    42     32   BLAKE3 of the result chunk
    74          payload (``hotswap.encodings``: a sparse patch or a whole XOR)

Which blobs an agent fetches to reach a version (full, or a chain of these
deltas) is ``hotswap.chain``'s part.

Errors: FormatError for a malformed frame; IntegrityError when decoded
bytes do not hash to the frame's digest; ConfigError for a bad argument.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np
import numpy.typing as npt

from hotswap import encodings, workers
from hotswap.encodings import Encoding
from hotswap.errors import ConfigError, FormatError, IntegrityError
from hotswap.manifest import MAX_CHUNK_BYTES

MAGIC = b"HSD"
FORMAT = 1


HEADER = struct.Struct("<3sBBBI32s32s")
HEADER_BYTES = HEADER.size

# A delta is stored only when its frames take at most this fraction of the
# full tensor: past it, the encode and decode time and the dependence on a
# base cost more than the bytes saved, and the publisher stores a full blob.
MAX_DELTA_FRACTION = 0.7
# Before encoding, ``encode`` XORs a sample of the tensor and gives up when
# fewer than this fraction of its bytes are zero: unrelated weights then cost
# a glance, not a full encode, before falling back to a full blob.
MIN_ZERO_FRACTION = 0.25
# The sample: this many evenly spread slices of this many bytes (the whole
# tensor when smaller). Enough to see a tensor's kind of change, little
# enough to be free next to a transfer of the tensor.
PROBE_SLICES = 16
PROBE_SLICE_BYTES = 4096

Bytes = npt.NDArray[np.uint8]
Buffer = bytes | bytearray | memoryview


# -- frames --------------------------------------------------------------------


@dataclass(frozen=True)
class FrameHeader:
    """What a frame declares: its encoding, the chunk's length, both ends' digests."""

    encoding: Encoding
    length: int
    base_digest: bytes
    result_digest: bytes


def chunk_digest(chunk: Buffer) -> bytes:
    """BLAKE3 of one chunk (32 bytes), on the calling thread."""
    return bytes(blake3.blake3(chunk, max_threads=1).digest())


def _array(buf: Buffer) -> Bytes:
    array: Bytes = np.frombuffer(buf, dtype=np.uint8)
    return array


def encode_frame(
    new_chunk: Buffer,
    base_chunk: Buffer,
    *,
    itemsize: int = 1,
    encoding: Encoding | None = None,
    base_digest: bytes | None = None,
    result_digest: bytes | None = None,
) -> bytes:
    """One frame that turns ``base_chunk`` into ``new_chunk`` (and back).

    Args:
        new_chunk: the result chunk's bytes.
        base_chunk: the same byte range of the base, as long as ``new_chunk``.
        itemsize: the tensor's element size (a sparse patch indexes elements).
        encoding: force a payload encoding; None chooses by how much changed.
        base_digest, result_digest: the chunks' ``chunk_digest`` where the
            caller has them (the result of the last frame is the base of the
            next), saving a hash; trusted as given.

    Returns:
        The frame: header then payload.

    Raises:
        ConfigError: the chunks differ in length or exceed a chunk's limit, or
            ``encoding`` forces a sparse patch on a chunk where too much changed.

    Example::

        frame = delta.encode_frame(new[:1 << 20], old[:1 << 20], itemsize=2)
        delta.decode_frame(frame, old[:1 << 20], memoryview(out)[:1 << 20])
    """
    if len(new_chunk) != len(base_chunk):
        raise ConfigError(
            f"delta frame: new chunk is {len(new_chunk)} bytes, base {len(base_chunk)}"
        )
    if len(new_chunk) > MAX_CHUNK_BYTES:
        raise ConfigError(f"delta frame: {len(new_chunk)} bytes, limit {MAX_CHUNK_BYTES}")
    encoding, payload = encodings.encode(_array(new_chunk), _array(base_chunk), itemsize, encoding)
    header = HEADER.pack(
        MAGIC,
        FORMAT,
        int(encoding),
        0,
        len(new_chunk),
        base_digest or chunk_digest(base_chunk),
        result_digest or chunk_digest(new_chunk),
    )
    return header + payload


def read_header(frame: Buffer, where: str = "delta frame") -> FrameHeader:
    """The header of a frame, checked; FormatError if it is not one this hotswap reads."""
    if len(frame) < HEADER_BYTES:
        raise FormatError(f"{where}: {len(frame)} bytes, shorter than a frame header")
    magic, version, encoding, flags, length, base, result = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise FormatError(f"{where}: not a delta frame (magic {magic!r})")
    if version != FORMAT:
        raise FormatError(
            f"{where}: frame format {version} is not supported (this hotswap reads "
            f"{FORMAT}); upgrade hotswap"
        )
    if not encodings.known(encoding):
        raise FormatError(
            f"{where}: unknown encoding id {encoding} (this hotswap knows "
            f"{', '.join(f'{int(e)} {e.wire_name}' for e in Encoding)}); upgrade hotswap"
        )
    if flags:
        raise FormatError(f"{where}: unknown flags {flags:#04x}")
    return FrameHeader(Encoding(encoding), length, base, result)


def decode_frame(
    frame: Buffer,
    base_chunk: Buffer,
    out: memoryview,
    *,
    backwards: bool = False,
    where: str = "delta frame",
    verify: bool = True,
) -> encodings.Patched | None:
    """Write the chunk a frame produces from ``base_chunk`` into ``out``, and verify it.

    Returns where a sparse patch wrote (``encodings.Patched``: ``out`` equals
    ``base_chunk`` everywhere else), None for the other encodings.

    Never writes or allocates more than ``len(out)`` bytes of output, whatever
    the payload claims: a compressed payload that would expand further is
    refused as soon as it passes that size. After an error ``out`` holds
    unspecified bytes (it is staging memory, never live).

    Args:
        frame: one frame, as ``encode_frame`` made it.
        base_chunk: the byte range of the base the frame starts from (with
            ``backwards``, of the frame's result).
        out: a flat byte view (format ``B``) of exactly the chunk's length;
            may be ``base_chunk``'s own memory.
        backwards: decode the delta from result to base (XOR is symmetric),
            verifying against the frame's base digest.
        where: names the model, version, tensor and chunk in messages.
        verify: hash the decoded chunk against the frame's digest. Only a
            caller that checks the whole result against a signed digest
            itself (``hotswap.reconstruct``: the tensor a route ends at, which
            the manifest names) passes False, and decodes again with True to
            find the broken frame when that check fails.

    Raises:
        FormatError: the frame is malformed, of an unknown format or
            encoding, declares another length than ``out``'s, or its payload
            decodes to more or fewer bytes than declared.
        IntegrityError: the decoded bytes do not hash to the frame's digest.
    """
    header = read_header(frame, where)
    if header.length != len(out) or len(base_chunk) != len(out):
        raise FormatError(
            f"{where}: declares {header.length} bytes, the chunk is {len(out)} "
            f"(base {len(base_chunk)})"
        )
    payload = memoryview(frame)[HEADER_BYTES:]
    patched = encodings.decode(header.encoding, payload, _array(base_chunk), _array(out), where)
    if not verify:
        return patched
    expected = header.base_digest if backwards else header.result_digest
    if chunk_digest(out) != expected:
        raise IntegrityError(
            f"{where}: decoded bytes hash to {chunk_digest(out).hex()[:16]}..., the frame "
            f"says {expected.hex()[:16]}... ({_cause(header, base_chunk, out, backwards)}); "
            "fetch the full blob"
        )
    return patched


def _cause(header: FrameHeader, base_chunk: Buffer, out: memoryview, backwards: bool) -> str:
    """Why decoded bytes missed their digest, for the message: the base or the frame."""
    if np.shares_memory(_array(base_chunk), _array(out)):
        return "the frame is corrupted or the base was not its start"  # the base is gone
    start = header.result_digest if backwards else header.base_digest
    if chunk_digest(base_chunk) != start:
        return "the base bytes are not the ones the delta starts from"
    return "the frame is corrupted"


# -- whole tensors ---------------------------------------------------------------


def _spans(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_bytes, nbytes)) for s in range(0, nbytes, chunk_bytes)]


def _mostly_same(
    new: memoryview, base: memoryview, itemsize: int, max_fraction: float = 1.0
) -> bool:
    """Whether a sample of ``new`` XOR ``base`` is zero often enough, and encodes
    small enough, to try a delta.

    The second test spares a whole encode that would end over ``max_fraction``
    (random new weights share half their XOR's bytes by chance, yet encode to
    most of the tensor), so such a tensor costs a glance, not an encode,
    before its full blob. The sample is encoded as a chunk would be
    (``encodings.encode``), so it sees what the frames would store.
    """
    n = len(new)
    size = min(PROBE_SLICE_BYTES, n)
    # Slices start on a multiple of the widest element, as chunks do.
    step = 8 if size % 8 == 0 else 1
    starts = sorted(
        {(n - size) * i // max(1, PROBE_SLICES - 1) // step * step for i in range(PROBE_SLICES)}
    )
    picked = [slice(s, s + size) for s in starts]
    new_sample = np.concatenate([_array(new[p]) for p in picked])
    base_sample = np.concatenate([_array(base[p]) for p in picked])
    zeros = new_sample.size - int(np.count_nonzero(new_sample != base_sample))
    if zeros < MIN_ZERO_FRACTION * new_sample.size:
        return False
    if max_fraction >= 1.0:
        return True
    _, payload = encodings.encode(new_sample, base_sample, itemsize)
    return len(payload) <= max_fraction * new_sample.size


def encode(
    new: memoryview,
    base: memoryview,
    chunk_bytes: int,
    *,
    itemsize: int = 1,
    encoding: Encoding | None = None,
    max_fraction: float = MAX_DELTA_FRACTION,
    base_digests: Sequence[bytes] | None = None,
    probe: bool = True,
) -> list[bytes] | None:
    """The frames of a tensor's delta from ``base`` to ``new``, or None when not worth it.

    None when the frames would take more than ``max_fraction`` of the full
    bytes: the caller stores a full blob. A sample decides first whether to
    try (unrelated weights cost a glance), and encoding stops as soon as the
    frames pass the limit. The delta is symmetric: decoded ``backwards`` it
    takes ``new`` back to ``base``.

    Args:
        new: the tensor's new bytes.
        base: the bytes it replaces (same length: same dtype and shape).
        chunk_bytes: the result's chunk size; frame ``i`` covers bytes
            ``[i*chunk_bytes, (i+1)*chunk_bytes)``.
        itemsize: the tensor's element size in bytes (its dtype's).
        encoding: force one payload encoding; None chooses per chunk.
        max_fraction: the largest delta worth storing, as a fraction of the full bytes.
        base_digests: each base chunk's ``chunk_digest``, where the caller
            kept them (``result_digests`` of the delta that made the base):
            saves hashing the base again; trusted as given.
        probe: glance at a sample first; False where the caller expects a
            small delta (the last one of this tensor was), so the glance
            would only add its cost.

    Returns:
        One frame per chunk, or None.

    Raises:
        ConfigError: ``new`` and ``base`` differ in length, ``chunk_bytes``
            is out of range, or ``base_digests`` has another count than the chunks.

    Example::

        frames = delta.encode(
            codec.as_bytes(new), codec.as_bytes(old), 1 << 20, itemsize=new.element_size()
        )
        if frames is None:
            ...  # store a full blob
    """
    if len(new) != len(base):
        raise ConfigError(f"delta: new bytes are {len(new)}, base {len(base)}")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"delta: chunk size {chunk_bytes} is outside 1-{MAX_CHUNK_BYTES}")
    spans = _spans(len(new), chunk_bytes)
    if base_digests is not None and len(base_digests) != len(spans):
        raise ConfigError(f"delta: {len(base_digests)} base digests for {len(spans)} chunks")
    if not new or (probe and not _mostly_same(new, base, itemsize, max_fraction)):
        return None
    limit = max_fraction * len(new)
    jobs = (
        functools.partial(
            encode_frame,
            new[start:end],
            base[start:end],
            itemsize=itemsize,
            encoding=encoding,
            base_digest=base_digests[i] if base_digests is not None else None,
        )
        for i, (start, end) in enumerate(spans)
    )
    frames: list[bytes] = []
    stored = 0
    # Chunks encode on every core (hotswap.workers), in order; a delta that
    # passes the limit stops there, its later chunks never started.
    with contextlib.closing(workers.ordered(jobs, parallel=len(spans) > 1)) as results:
        for frame in results:
            frames.append(frame)
            stored += len(frame)
            if stored > limit:
                return None
    return frames


def decode(
    frames: Sequence[Buffer],
    base: memoryview,
    out: memoryview,
    chunk_bytes: int,
    *,
    backwards: bool = False,
    where: str = "delta",
) -> None:
    """Decode and verify every frame of a tensor's delta into ``out``.

    Args:
        frames: the delta blob's chunks, in order.
        base: the bytes the delta starts from (its result, with ``backwards``).
        out: as long as ``base``; may be ``base`` itself (decoded in place).
        chunk_bytes: the chunk size the delta was encoded with.
        backwards: take the delta's result back to its base.
        where: names the model, version and tensor in messages.

    Raises:
        FormatError: a frame count or length that does not fit, or a bad frame.
        IntegrityError: a chunk whose decoded bytes do not match its frame.
    """
    if len(base) != len(out):
        raise FormatError(f"{where}: base is {len(base)} bytes, the tensor {len(out)}")
    spans = _spans(len(out), chunk_bytes)
    if len(frames) != len(spans):
        raise FormatError(
            f"{where}: {len(frames)} frames for {len(spans)} chunks of {chunk_bytes} bytes"
        )
    for i, ((start, end), frame) in enumerate(zip(spans, frames, strict=True)):
        decode_frame(
            frame, base[start:end], out[start:end], backwards=backwards, where=f"{where} chunk {i}"
        )


def encodings_used(frames: Sequence[Buffer]) -> set[Encoding]:
    """The payload encodings a delta's frames use (what a manifest lists for agents)."""
    return {read_header(frame).encoding for frame in frames}


def result_digests(frames: Sequence[Buffer]) -> list[bytes]:
    """Each frame's result chunk digest: the next delta's ``base_digests``."""
    return [read_header(frame).result_digest for frame in frames]


# -- how a delta blob is named, checked and bounded ------------------------------


def blob_name(base: str, result: str, chunk_bytes: int) -> str:
    """The name of the delta blob from content ``base`` to ``result`` (``DeltaRef.blob``).

    Digest-shaped, so the blob lives under the usual blob keys and index; the
    same delta is never stored twice, and an entry whose ``DeltaRef`` names
    ``blob_name(entry.digest, ref.base, ...)`` reads that blob backwards.
    """
    seed = b"hotswap-delta:" + base.encode() + b":" + result.encode() + b":"
    return blake3.blake3(seed + str(chunk_bytes).encode()).hexdigest()


def frames_digest(chunk_digests: Sequence[bytes]) -> str:
    """``DeltaRef.frames_digest``: BLAKE3 over the entry's content chunk digests, in order.

    The frames carry those digests (as results, or as bases for a blob the
    entry reads backwards) in unsigned blob bytes; this digest in the signed
    manifest lets a reader trust each frame's check.
    """
    return blake3.blake3(b"".join(chunk_digests)).hexdigest()


def max_frame_bytes(length: int) -> int:
    """The most bytes a well-formed frame of a ``length``-byte chunk can take.

    A header, a sparse head, and a zstd frame of at most the chunk's length,
    which zstd never compresses to more than its compress bound: what a reader
    allows a stored frame before refusing it as oversized.
    """
    small = (128 * 1024 - length) >> 11 if length < 128 * 1024 else 0
    return HEADER_BYTES + 5 + length + (length >> 8) + small
