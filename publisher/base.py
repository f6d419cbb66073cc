"""The publisher's base: the parent's bytes a delta is encoded against.

A ``Publisher`` keeps the bytes of what it last published in host memory
(``Base``, by content digest, with each chunk's BLAKE3 where a delta gave
them): one copy of the published tensors, the one exception to its
streaming memory budget (README, ``HOTSWAP_DELTA_BASE``), so that a training
loop's next publish reads nothing back from Redis and hashes each chunk
once. A new publisher, a CLI publish, or one with ``delta_base`` off reads
the parent's bytes from Redis instead, rebuilt from its full blob or a chain
of deltas (``hotswap.reconstruct``); where no stored blobs reach them, the
tensor goes as a full blob (the report says so).

``Encoder`` is one publish's use of the base: for each new content, its
parent, the parent's bytes (memory, Redis, or missing), and the frames.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hotswap import chain, codec, delta, dtypes
from hotswap.candidates import History
from hotswap.entries import DeltaRef, TensorEntry
from hotswap.errors import IntegrityError
from hotswap.manifest import Manifest
from hotswap.reconstruct import Rebuild
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import deltas, patchstats

# Where a delta candidate's base came from: this publisher's memory, Redis,
# or nowhere (the tensor went as a full blob).
SOURCES = ("memory", "redis", "missing")
# A tensor whose delta was refused (not worth storing) n times in a row goes
# full without a glance for its next min(2**n - 1, this) publishes: new
# weights every step cost no probes, and a loop that starts stepping again
# gets deltas back within a few publishes.
MAX_SKIPS = 7


@dataclass
class Kept:
    """One content's bytes, and each chunk's BLAKE3 at ``chunk_bytes`` where known.

    ``copying`` is the copy into ``data`` while it is made in another thread;
    ``Base.get`` waits for it.
    """

    data: npt.NDArray[np.uint8]
    chunk_bytes: int
    digests: list[bytes] | None
    copying: Future[None] | None = None


class Base:
    """The bytes of the contents this publisher published last, by digest.

    Looked up by digest, never by version: after a failed publish, or when
    another publisher committed meanwhile, whatever it holds is still the
    bytes of the content it names, and what is missing is read from Redis.
    """

    def __init__(self) -> None:
        self._kept: dict[str, Kept] = {}
        # By tensor name: (refusals in a row, publishes still to go full unprobed).
        self._refused: dict[str, tuple[int, int]] = {}

    def get(self, digest: str) -> Kept | None:
        kept = self._kept.get(digest)
        if kept is not None and kept.copying is not None:
            kept.copying.result()  # its bytes are whole only once copied
        return kept

    def keep(
        self,
        digest: str,
        data: memoryview,
        chunk_bytes: int,
        digests: list[bytes] | None,
        copier: Executor | None = None,
    ) -> Future[None] | None:
        """Copy ``data`` (the content ``digest``) into the base; with ``copier``, in its
        thread (numpy copies without holding the GIL), returning the copy's future.

        The memory is taken here, in the calling thread, so that it comes from
        the same allocator arena the replaced contents are freed to.
        """
        if digest in self._kept:
            return None
        copy: npt.NDArray[np.uint8] = np.empty(len(data), dtype=np.uint8)
        source = np.frombuffer(data, dtype=np.uint8)
        if copier is None:
            np.copyto(copy, source)
            self._kept[digest] = Kept(copy, chunk_bytes, digests)
            return None
        copying = copier.submit(np.copyto, copy, source)
        self._kept[digest] = Kept(copy, chunk_bytes, digests, copying)
        return copying

    def skips(self, name: str) -> bool:
        """Whether ``name`` goes full unprobed this publish (its deltas were refused lately)."""
        streak, left = self._refused.get(name, (0, 0))
        if left <= 0:
            return False
        self._refused[name] = (streak, left - 1)
        return True

    def skips_next(self, name: str) -> bool:
        """Whether ``name``'s next publish goes full unprobed: its bytes now need no copy."""
        return self._refused.get(name, (0, 0))[1] > 0

    def refused(self, name: str, refused: bool) -> None:
        """Note whether ``name``'s delta was just refused (or stored)."""
        if not refused:
            self._refused.pop(name, None)
            return
        streak = self._refused.get(name, (0, 0))[0] + 1
        self._refused[name] = (streak, min(2**streak - 1, MAX_SKIPS))

    def drop(self, digest: str) -> None:
        self._kept.pop(digest, None)

    def retain(self, digests: Collection[str]) -> None:
        """Forget every content but ``digests`` (the version just published)."""
        self._kept = {d: k for d, k in self._kept.items() if d in digests}

    @property
    def nbytes(self) -> int:
        """Host memory the kept bytes take."""
        return sum(len(k.data) for k in self._kept.values())


@dataclass
class Tally:
    """What one publish's deltas did, for its report."""

    tensors: int = 0  # new contents stored as deltas
    keyframes: int = 0  # of which the full blob was stored too
    stored_bytes: int = 0  # their frames' bytes
    read_bytes: int = 0  # bytes of parents read back from Redis
    bases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))

    def report(self, held: int) -> dict[str, Any]:
        """The ``PublishReport`` fields of these deltas, and the base's ``held`` bytes."""
        return {
            "tensors_delta": self.tensors,
            "keyframes": self.keyframes,
            "bytes_delta": self.stored_bytes,
            "bases": {k: n for k, n in self.bases.items() if n},
            "bytes_base_read": self.read_bytes,
            "base_held": held,
        }

    def log_fields(self) -> dict[str, str | int | float]:
        """The log entry's fields for these deltas (``hotswap log``)."""
        return {
            "tensors_delta": self.tensors,
            "keyframes": self.keyframes,
            "bytes_delta": self.stored_bytes,
            "bases": ", ".join(f"{k} {n}" for k, n in self.bases.items() if n),
        }


def encoder_for(
    store: Store,
    settings: HotswapSettings,
    parent: Manifest | None,
    entries: Sequence[TensorEntry],
    kept: Base,
) -> Encoder | None:
    """One publish's ``Encoder`` on top of ``parent`` (None: the version has no trusted
    parent), or None with ``deltas`` off (then nothing is kept in memory either)."""
    if not settings.deltas:
        kept.retain(())
        return None
    return Encoder(
        store, parent, kept if settings.delta_base else None, {e.digest for e in entries}
    )


@dataclass(frozen=True)
class Encoded:
    """A content's delta: its ``DeltaRef``, and the frames to upload (none when reused)."""

    ref: DeltaRef
    frames: list[bytes]
    # Each chunk's BLAKE3 of the new content: the next delta's base digests.
    digests: list[bytes]
    # The content's statistics, derived from the frames (``patchstats``); None:
    # measure the tensor whole.
    stats: codec.Stats | None = None


class Encoder:
    """One publish's deltas: each new content's parent, its bytes, and the frames.

    Args:
        store: the model's store, to read a parent Redis holds.
        parent: the parent version's manifest (None: no trusted parent).
        base: the publisher's ``Base`` (None: ``delta_base`` off, read Redis).
        wanted: the digests of the version being published: their bytes stay
            in the base, the parents' others go once encoded against.
    """

    def __init__(
        self,
        store: Store,
        parent: Manifest | None,
        base: Base | None,
        wanted: Collection[str],
    ) -> None:
        self.store = store
        self.parent = parent
        self.parents = parent.by_name() if parent is not None else {}
        self.base = base
        self.wanted = wanted
        self._history: History | None = None
        self.tally = Tally()
        self._uses: Counter[str] = Counter()

    def encode(self, entry: TensorEntry, data: memoryview) -> Encoded | None:
        """The delta ``entry``'s bytes ``data`` are stored as, None for a full blob."""
        parent = deltas.parent_of(entry, self.parents)
        if parent is None:
            return None
        if parent.delta is not None and parent.delta.base == entry.digest:
            digests = deltas.chunk_digests(data, entry.chunk_bytes)
            back = deltas.backward(parent, entry, digests)
            if back is not None:  # needs no base: nothing is encoded
                self._count(back)
                return Encoded(back, [], digests)
        if self.base is not None and self.base.skips(entry.name):
            return None
        kept = self._kept(parent)
        source, base = ("memory", kept.data.data) if kept else self._read(parent)
        self.tally.bases[source] += 1
        if base is None:
            return None
        frames = delta.encode(
            data,
            base,
            entry.chunk_bytes,
            itemsize=dtypes.DTYPES[entry.dtype].itemsize,
            # A delta over the keyframe fraction would be stored with a full
            # blob at once: more bytes and time than the full blob alone.
            max_fraction=min(delta.MAX_DELTA_FRACTION, chain.KEYFRAME_FRACTION),
            base_digests=_digests(kept, entry),
            # The parent went as a delta: this step is likely alike, and an
            # encode that turns out too large stops at the limit anyway.
            probe=parent.delta is None,
        )
        if self.base is not None:
            self.base.refused(entry.name, frames is None)
        if frames is None:
            return None
        ref = deltas.forward(parent, entry, frames)
        self._count(ref)
        self.tally.stored_bytes += ref.stored_bytes
        # A keyframe is measured whole: derived figures drift by a rounding a link.
        stats = None if ref.keyframe else patchstats.derived(parent, entry, frames, base)
        return Encoded(ref, frames, delta.result_digests(frames), stats)

    def _count(self, ref: DeltaRef) -> None:
        self.tally.tensors += 1
        self.tally.keyframes += ref.keyframe

    def _kept(self, parent: TensorEntry) -> Kept | None:
        return self.base.get(parent.digest) if self.base is not None else None

    def _read(self, parent: TensorEntry) -> tuple[str, memoryview | None]:
        """The parent's bytes from Redis: ("redis", bytes), or ("missing", None).

        Rebuilt from whatever stored blobs reach them (``hotswap.reconstruct``:
        a full blob, or a chain of deltas from one), each link checked and the
        result hashed to the parent's digest. Blobs gone or altered leave the
        tensor to a full blob: a publish never fails for want of a base.
        """
        if self.parent is None:
            return "missing", None
        if self._history is None:  # one walk of older manifests per publish
            self._history = History(self.store, self.parent)
        where = f"model {self.store.model!r} v{self.parent.version}"
        rebuild = Rebuild(self.store.blobs, self.parent, parent, history=self._history, where=where)
        out = bytearray(parent.nbytes)
        try:
            rebuild.into(memoryview(out))
        except IntegrityError:
            return "missing", None
        finally:
            self.tally.read_bytes += rebuild.fetched
        return "redis", memoryview(out)

    def learn(
        self,
        entry: TensorEntry,
        data: memoryview,
        digests: list[bytes] | None,
        copier: Executor | None = None,
    ) -> Future[None] | None:
        """Keep ``entry``'s new bytes as the next publish's base (``delta_base`` on), copied
        in ``copier``'s thread where given (``Base.keep``); not where the next publish
        goes full unprobed anyway (new weights every step cost no copy either)."""
        if self.base is None or self.base.skips_next(entry.name):
            return None
        return self.base.keep(entry.digest, data, entry.chunk_bytes, digests, copier)

    def forget(self, digest: str) -> None:
        """Drop a content whose bytes were not read unchanged (its copy may be torn)."""
        if self.base is not None:
            self.base.drop(digest)

    def expect(self, todo: Iterable[TensorEntry]) -> None:
        """Count the parents ``todo`` will ask for, so that ``done`` drops each after its
        last use: the base stays at about one copy of the model while it is replaced."""
        for e in todo:
            parent = self.parents.get(e.name)
            if parent is not None:
                self._uses[parent.digest] += 1

    def done(self, entry: TensorEntry) -> None:
        """``entry`` is stored: drop its parent's bytes if nothing else needs them."""
        parent = self.parents.get(entry.name)
        if parent is None or self.base is None:
            return
        self._uses[parent.digest] -= 1
        if self._uses[parent.digest] <= 0 and parent.digest not in self.wanted:
            self.base.drop(parent.digest)


def _digests(kept: Kept | None, entry: TensorEntry) -> list[bytes] | None:
    """The kept base's chunk digests, where they were taken at ``entry``'s chunk size."""
    if kept is None or kept.digests is None or kept.chunk_bytes != entry.chunk_bytes:
        return None
    return kept.digests
