"""Which delta a new content is stored as, pure: its parent, its ``DeltaRef``, keyframes.

No Redis here: frames and manifest entries in, a ``DeltaRef`` out. The
publisher (``publisher.base``) finds the parent's bytes and encodes the
frames (``hotswap.delta``); these functions decide what the manifest says
about them.

A tensor is a delta candidate when the parent version holds a tensor of the
same name, dtype and shape with other bytes. Its ``DeltaRef`` counts the
links since the last full blob along the chain it extends (``depth``) and
their stored bytes (``chain_bytes``): a parent stored full, or as a keyframe,
starts a new chain. When ``hotswap.chain.keyframe_due`` says the chain is
long enough, the full blob is stored too (``keyframe``), and the next delta
starts from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hotswap import chain, delta
from hotswap.entries import MAX_DEPTH, DeltaRef, TensorEntry


def parent_of(entry: TensorEntry, parents: Mapping[str, TensorEntry]) -> TensorEntry | None:
    """The parent's entry ``entry`` may be a delta from, None if there is none.

    Same name, dtype and shape, other bytes, and a chain short enough to
    extend (a manifest bounds ``depth`` at ``entries.MAX_DEPTH``).
    """
    parent = parents.get(entry.name)
    if parent is None or not entry.nbytes or parent.digest == entry.digest:
        return None
    if (parent.dtype, parent.shape) != (entry.dtype, entry.shape):
        return None
    if _chain(parent, 0)[0] > MAX_DEPTH:
        return None
    return parent


def _chain(parent: TensorEntry, stored: int) -> tuple[int, int]:
    """(depth, chain bytes) of a delta of ``stored`` bytes from ``parent``'s content."""
    ref = parent.delta
    if ref is None or ref.keyframe:
        return 1, stored  # the parent's full blob is stored: a new chain
    return ref.depth + 1, ref.chain_bytes + stored


def forward(parent: TensorEntry, entry: TensorEntry, frames: Sequence[bytes]) -> DeltaRef:
    """The ``DeltaRef`` of ``frames``, which turn ``parent``'s content into ``entry``'s."""
    stored = sum(len(f) for f in frames)
    depth, chain_bytes = _chain(parent, stored)
    return DeltaRef(
        encodings=tuple(sorted(e.wire_name for e in delta.encodings_used(frames))),
        base=parent.digest,
        blob=delta.blob_name(parent.digest, entry.digest, entry.chunk_bytes),
        stored_bytes=stored,
        frames_digest=delta.frames_digest(delta.result_digests(frames)),
        keyframe=chain.keyframe_due(depth, chain_bytes, entry.nbytes),
        depth=depth,
        chain_bytes=chain_bytes,
    )


def backward(
    parent: TensorEntry, entry: TensorEntry, chunk_digests: Sequence[bytes]
) -> DeltaRef | None:
    """``parent``'s own delta read backwards, where it starts from ``entry``'s content.

    A publish that returns to the content before head's (a step undone)
    stores no new bytes: XOR is symmetric, and the blob that took that
    content to head's takes head's back. ``chunk_digests`` are ``entry``'s
    content chunk digests (the frames' base digests), for ``frames_digest``.
    None where ``parent`` is not a delta from ``entry``'s content in its chunks.
    """
    ref = parent.delta
    if ref is None or ref.base != entry.digest or parent.chunk_bytes != entry.chunk_bytes:
        return None
    depth, chain_bytes = _chain(parent, ref.stored_bytes)
    return DeltaRef(
        encodings=ref.encodings,
        base=parent.digest,
        blob=ref.blob,
        stored_bytes=ref.stored_bytes,
        frames_digest=delta.frames_digest(chunk_digests),
        keyframe=chain.keyframe_due(depth, chain_bytes, entry.nbytes),
        depth=depth,
        chain_bytes=chain_bytes,
    )


def chunk_digests(data: memoryview, chunk_bytes: int) -> list[bytes]:
    """Each chunk's BLAKE3 (``delta.chunk_digest``), as frames carry them."""
    return [delta.chunk_digest(data[s : s + chunk_bytes]) for s in range(0, len(data), chunk_bytes)]
