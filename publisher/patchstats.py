"""A sparse delta's statistics from its changed elements, not a pass over the tensor.

A manifest entry carries its content's L2 norm and largest magnitude
(``codec.stats``), which agents check the bytes they fetch against. For a
content stored as sparse frames from its parent's bytes (an RL step in
bfloat16), every element outside the frames is the parent's, so:

* norm^2 = the parent's norm^2 + the sum over the changed elements of
  (new^2 - old^2), in float64, where the squares of 16- and 32-bit floats
  are exact (the agents' ``hotswap.patchcheck`` derives the same way);
* the largest magnitude is the parent's or a changed element's new one,
  unless a changed element held the parent's largest magnitude (then another
  may or may not: a full pass decides).

Anything else (another encoding in a frame, a non-finite value, a norm that
fell by more than ``patchcheck.MAX_FALL``, a parent without finite figures,
float64 or integer dtypes) returns None and the publisher measures the
tensor whole. A full pass at every keyframe (``chain.MAX_CHAIN`` links at
most) bounds how far derived figures can drift from a full pass's: a float64
rounding of the squares' sum a link.

Pure: no Redis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from hotswap import codec, delta, encodings
from hotswap.encodings import Encoding
from hotswap.manifest import TensorEntry
from hotswap.patchcheck import MAX_FALL

# Dtypes whose squares float64 holds exactly, so that derived and measured
# sums differ only by their order.
EXACT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_UNSIGNED = {2: np.uint16, 4: np.uint32}
# Past this fraction of the elements changed, a full pass over the tensor
# (``codec.stats``) costs no more than gathering the changed ones.
MAX_CHANGED = 1 / 32


def _floats(words: npt.NDArray[np.unsignedinteger], dtype: str) -> npt.NDArray[np.floating]:
    """Words of a float dtype as exact float32 (or float16) values, with numpy alone."""
    if dtype == "BF16":  # the high half of a float32
        wide: npt.NDArray[np.floating] = (words.astype(np.uint32) << 16).view(np.float32)
        return wide
    if dtype == "F16":
        half: npt.NDArray[np.floating] = words.view(np.float16)
        return half
    single: npt.NDArray[np.floating] = words.view(np.float32)
    return single


def derived(
    parent: TensorEntry, entry: TensorEntry, frames: Sequence[bytes], base: memoryview
) -> codec.Stats | None:
    """``entry``'s statistics from ``parent``'s and the ``frames`` that take ``base``
    (``parent``'s bytes) to it; None where a full pass must measure them.

    Example::

        stats = derived(parent, entry, frames, base) or codec.stats(tensor)
    """
    dtype = EXACT.get(entry.dtype)
    if (
        dtype is None
        or parent.dtype != entry.dtype
        or parent.nbytes != entry.nbytes
        or len(base) != entry.nbytes
        or len(frames) != entry.chunks
        or not (math.isfinite(parent.norm) and parent.norm > 0)
        or not math.isfinite(parent.max_abs)
    ):
        return None
    width = dtype.itemsize
    where = f"tensor {entry.name!r}: delta frame"
    payloads = []
    changed = 0
    for frame in frames:
        header = delta.read_header(frame, where)
        payload = memoryview(frame)[delta.HEADER_BYTES :]
        count = encodings.sparse_count(payload)
        if header.encoding is not Encoding.SPARSE_ZSTD or count is None:
            return None
        payloads.append((header, payload))
        changed += count
    if changed > MAX_CHANGED * (entry.nbytes // width):
        return None  # gathering that many elements costs what a full pass does
    grown = had = top_new = top_old = 0.0
    for i, (header, payload) in enumerate(payloads):
        start = i * entry.chunk_bytes
        change = encodings.sparse_change(payload, header.length, f"{where} {i}")
        if change.width != width:
            return None
        if not change.at.size:
            continue
        words = np.frombuffer(base[start : start + header.length], dtype=_UNSIGNED[width])
        old_words = words[change.at]
        old, new = _floats(old_words, entry.dtype), _floats(old_words ^ change.xor, entry.dtype)
        o64, n64 = old.astype(np.float64), new.astype(np.float64)
        # numpy's own pairwise sums, not BLAS: a threaded BLAS dot spins on a busy host.
        grown += float(np.square(n64).sum())
        had += float(np.square(o64).sum())
        # NaN and infinity propagate into the maxima and sums: refused below.
        top_new = max(top_new, float(np.abs(new).max()))
        top_old = max(top_old, float(np.abs(old).max()))
    if not all(math.isfinite(x) for x in (grown, had, top_new, top_old)):
        return None
    before = parent.norm * parent.norm
    squares = before + (grown - had)
    if not math.isfinite(squares) or squares < MAX_FALL * before:
        return None
    if top_old >= parent.max_abs:
        return None  # the largest may have been changed away: a full pass finds it
    return codec.Stats(math.sqrt(squares), max(parent.max_abs, top_new))
