"""Per-chunk digests: written by publishers, checked by ranks that read part of a tensor.

Imports no Redis. A manifest entry's digest is the BLAKE3 of the whole
tensor, so checking it needs every byte. An entry of two chunks or more also
carries ``CHUNK_DIGEST_BYTES`` of BLAKE3 per stored chunk
(``TensorEntry.chunk_digests``): a reader of a slice reads the chunks that
cover it, whole, and checks each against its own digest (docs/design.md,
"Slices: what a rank reads and how it verifies it").
"""

from __future__ import annotations

import blake3

from hotswap import codec, dtypes
from hotswap.entries import CHUNK_DIGEST_BYTES, MAX_CHUNK_DIGESTS, TensorEntry
from hotswap.errors import IntegrityError

# A chunk from this size is hashed on two threads (the default chunk is 1 MiB).
_THREADED_BYTES = 256 * 1024


def _one(chunk: memoryview | bytes) -> bytes:
    threads = 2 if len(chunk) >= _THREADED_BYTES else 1
    return bytes(blake3.blake3(chunk, max_threads=threads).digest(length=CHUNK_DIGEST_BYTES))


def worth(nbytes: int, chunk_bytes: int) -> bool:
    """Whether an entry of this size carries chunk digests: two chunks or more (one
    chunk's digest is the whole digest), and no more than the bound."""
    return 2 <= dtypes.chunk_count(nbytes, chunk_bytes) <= MAX_CHUNK_DIGESTS


def verifiable(entry: TensorEntry) -> bool:
    """Whether each chunk of ``entry`` can be checked on its own (``check_chunk``)."""
    return entry.chunk_digests is not None or entry.chunks == 1


def chunk_digests(buf: memoryview, chunk_bytes: int) -> bytes:
    """The chunk digests of ``buf`` cut at ``chunk_bytes``, concatenated in order.

    Example:
        >>> len(chunk_digests(memoryview(bytes(10000)), 4096))
        48
    """
    return b"".join(_one(buf[s : s + chunk_bytes]) for s in range(0, len(buf), chunk_bytes))


def check_chunk(entry: TensorEntry, i: int, chunk: memoryview, where: str) -> None:
    """Refuse chunk ``i`` of ``entry`` unless it hashes to its digest in the manifest.

    A tensor of one chunk states no chunk digests: its whole digest is its chunk's.

    Raises:
        IntegrityError: names model and version (``where``), tensor, chunk and digests.
    """
    if entry.chunk_digests is None and entry.chunks == 1:
        actual = blake3.blake3(chunk).hexdigest()
        codec.check_hexdigest(entry.name, actual, entry.digest, where)
        return
    assert entry.chunk_digests is not None
    want = entry.chunk_digests[i * CHUNK_DIGEST_BYTES : (i + 1) * CHUNK_DIGEST_BYTES]
    got = _one(chunk)
    if got != want:
        raise IntegrityError(
            f"{where} tensor {entry.name!r}: chunk {i} of {entry.chunks} hashes to "
            f"{got.hex()[:16]}..., the manifest says {want.hex()[:16]}... (corrupted in Redis "
            "or in transit); run `hotswap verify` and publish again"
        )
