"""Reading a route's blobs chunk by chunk, with every check a step can make on its own.

``LinkReader`` reads one delta of a route (``chain.Link``) frame by frame: the
frames' own direction (a blob stored the other way round flips the link),
their count, and the chunk digests they carry against the manifest's signed
``frames_digest``. ``recut`` hands on a full blob's streamed pieces at the
target's chunks. A failure is a ``Broken`` naming the blobs to drop, so the
caller (``hotswap.reconstruct``) plans again without them.

Imports no Redis: blobs come through the ``Blobs`` passed in (``BlobStore``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import blake3

from hotswap import chain, delta
from hotswap.candidates import Source, reads_backwards
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry


class Blobs(Protocol):
    """The part of ``BlobStore`` that reconstructing needs."""

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """Fill ``out`` with the entry's full blob; ``on_chunk(i, length)`` as each lands."""

    def stream(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """The entry's full blob in consecutive pieces."""

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """The frames of the entry's delta blob, in order."""


class Broken(Exception):
    """A step of a route failed: ``names`` are the blobs to drop ("" for the live bytes)."""

    def __init__(self, error: IntegrityError, *names: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.names = set(names)


class LinkReader:
    """One delta of a route, its frames read in order and their digests hashed."""

    def __init__(self, blobs: Blobs, link: chain.Link, source: Source) -> None:
        self.source = source
        self.blob = link.delta.blob
        self.reversed = bool(reads_backwards(source.entry))
        # The frames' own direction: a blob stored the other way round flips the link.
        self.backwards = link.backwards != self.reversed
        self._frames = iter(blobs.frames(source.entry, source.version))
        self._hasher = blake3.blake3()
        self.fetched = 0

    def next(self, i: int, where: str) -> memoryview:
        try:
            frame = next(self._frames)
        except StopIteration:
            raise Broken(IntegrityError(f"{where}: delta has no frame {i}"), self.blob) from None
        except IntegrityError as e:
            raise Broken(e, self.blob) from e
        self.fetched += len(frame)
        return frame

    def decoded(self, frame: memoryview) -> None:
        """Hash the digest of the entry's own content this frame carries."""
        header = delta.read_header(frame)
        self._hasher.update(header.base_digest if self.reversed else header.result_digest)

    def finish(self, where: str) -> None:
        """Check the frames' total (the reader's end) and their digests against the manifest."""
        try:
            for _ in self._frames:
                raise IntegrityError(f"{where}: delta has more frames than chunks")
        except IntegrityError as e:
            raise Broken(e, self.blob) from e
        ref = self.source.entry.delta
        if ref is not None and self._hasher.hexdigest() != ref.frames_digest:
            raise Broken(
                IntegrityError(
                    f"{where}: delta blob of v{self.source.version} does not carry the chunk "
                    "digests its manifest signs (corrupted or not this delta)"
                ),
                self.blob,
            )


def starts(frame: memoryview, base: memoryview, backwards: bool) -> bool:
    """Whether ``base`` is the chunk ``frame`` decodes from."""
    header = delta.read_header(frame)
    return delta.chunk_digest(base) == (header.result_digest if backwards else header.base_digest)


def recut(
    pieces: Iterator[memoryview],
    spans: Iterator[tuple[int, int]],
    longest: int,
    hasher: blake3.blake3,
    counted: Callable[[int], None],
) -> Iterator[memoryview]:
    """A blob's consecutive pieces cut again at ``spans``, each hashed as it passes.

    A piece holding a whole span is handed on as it is; spans across pieces
    (a blob stored at another chunk size) are gathered in one scratch chunk.
    """
    piece = memoryview(b"")
    scratch: memoryview | None = None
    for s, e in spans:
        size = e - s
        if len(piece) < size:
            if scratch is None:
                scratch = memoryview(bytearray(longest))
            have = len(piece)
            scratch[:have] = piece
            while have < size:
                got = next(pieces, None)
                if got is None:
                    raise IntegrityError("full blob ended before the tensor's size")
                piece = got
                counted(len(piece))
                take = min(size - have, len(piece))
                scratch[have : have + take] = piece[:take]
                have, piece = have + take, piece[take:]
            out = scratch[:size]
        else:
            out, piece = piece[:size], piece[size:]
        hasher.update(out)
        yield out
