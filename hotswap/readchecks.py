"""What a chunk or a delta frame read back from Redis must be, whichever path read it.

Pure: the lengths a manifest implies for chunk ``i``, the most bytes a frame of
that chunk may take, and the sum a delta's frames must reach (Redis holds
whatever anyone with write access put there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from hotswap.blobwrite import chunk_span
from hotswap.errors import IntegrityError
from hotswap.manifest import TensorEntry


def check_chunk(where: str, entry: TensorEntry, i: int, got: int | None) -> None:
    """Refuse chunk ``i`` read back as ``got`` bytes (None: absent), whichever path read it.

    Raises:
        IntegrityError: the chunk is missing, or not the length the manifest implies.
    """
    start, end = chunk_span(entry, i)
    if got is None:
        raise IntegrityError(
            f"{where} tensor {entry.name!r}: chunk {i} of {entry.chunks} is missing "
            "from Redis (collected or lost); publish again"
        )
    if got != end - start:
        raise IntegrityError(
            f"{where} tensor {entry.name!r}: chunk {i} is {got} bytes, "
            f"expected {end - start} (truncated or corrupted)"
        )


def frame_caps(entry: TensorEntry, chunks: range) -> list[int]:
    """The most bytes each frame of ``chunks`` of ``entry``'s delta may take."""
    from hotswap import delta

    return [
        delta.max_frame_bytes(chunk_span(entry, i)[1] - chunk_span(entry, i)[0]) for i in chunks
    ]


def checked_frames(
    where: str, entry: TensorEntry, got: Iterable[tuple[memoryview | None, int | None]]
) -> Iterator[memoryview]:
    """The frames of ``entry``'s delta as read (value, length per chunk, in order), each
    refused when missing or over its cap, and all together unless they add up to the
    ``stored_bytes`` the manifest declares.

    Raises:
        IntegrityError: names model, version, tensor and frame (``where`` names the first three).
    """
    ref = entry.delta
    assert ref is not None
    caps = frame_caps(entry, range(entry.chunks))
    total = 0
    for i, (cap, (frame, length)) in enumerate(zip(caps, got, strict=True)):
        if frame is None:
            problem = "is missing from Redis (collected or lost)"
            if length is not None:
                problem = f"is {length} bytes, over the {cap} a frame of its chunk can take"
            raise IntegrityError(f"{where} {i} of {entry.chunks} {problem}; publish again")
        total += len(frame)
        if total > ref.stored_bytes:
            break
        yield frame
    if total != ref.stored_bytes:
        raise IntegrityError(
            f"{where}s add up to {total if total <= ref.stored_bytes else 'more than'} "
            f"bytes, the manifest says {ref.stored_bytes}; publish again"
        )
