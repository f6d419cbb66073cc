"""One round trip for a version's small blobs, before an agent stages it.

An RL step changes every tensor a little: each is stored as a delta of a
few KiB, and a model's norms and biases change whole and are small. Read
one tensor at a time, each costs a round trip to Redis, and the round trips,
not the bytes, are what such a version's fetch spends its time on
(docs/performance.md, "Delta versions end to end"). ``Prefetched`` reads
them all in one pipelined batch up to a byte budget: the frames of every
delta whose base the agent runs (the route ``reconstruct.Rebuild`` takes
from the live bytes), and every full blob up to ``SMALL_BLOB_BYTES``. Reads
of anything else, or of these once their route changed, go to the store.

The prefetched bytes pass the same checks as the store's own reads
(``blobs.checked_frames``, ``blobs.check_chunk``): a frame missing or over
its cap, a chunk of the wrong length, frames that do not add up. Digests are
checked by the reader as for any read.

With the host cache on (``HOTSWAP_HOST_CACHE_DIR``, a ``SharedBlobStore``),
a blob the cache holds is read from it; of the rest, the blobs no other
agent of the host is fetching now are read in the one round trip and stored
in the cache for the others (``SharedBlobStore.claim``/``keep``: the fill
locks are held, without waiting for any, until they are stored); a blob
another agent is fetching now is left to the store, which waits for its file.

Redis I/O only through the ``BlobStore`` it wraps.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotswap import keys
from hotswap.blobs import BlobStore, check_chunk, checked_frames, frame_caps
from hotswap.blobwrite import PIPELINE_BYTES, chunk_span
from hotswap.candidates import reads_backwards
from hotswap.errors import IntegrityError
from hotswap.frames import Blobs
from hotswap.manifest import TensorEntry
from hotswap.sharedblobs import SharedBlobStore

if TYPE_CHECKING:
    from hotswap.hostcache import Slot

# Full blobs up to this size are read ahead (norms, biases: one chunk each).
SMALL_BLOB_BYTES = 64 * 1024

Got = list[tuple[memoryview | None, int | None]]


@dataclass(frozen=True)
class _Ahead:
    """One blob read ahead: its chunks' values and lengths, in order."""

    entry: TensorEntry
    version: int
    got: Got


def _key(entry: TensorEntry, version: int | None, frames: bool) -> tuple[object, ...]:
    blob = entry.delta.blob if frames and entry.delta is not None else entry.digest
    return (entry.name, blob, entry.chunk_bytes, entry.nbytes, version, frames)


class Prefetched:
    """``blobs`` with the small blobs of ``entries`` read ahead in one round trip.

    Args:
        blobs: the model's blob store.
        entries: the tensors a version changes, in the order they will be read.
        running: digest of the bytes each live tensor (by entry name) holds now.
        version: the version the entries belong to.
        budget: the most stored bytes read ahead.

    Example::

        reader = Prefetched.around(store.blobs, plan.fetch, digests, m.version)
        for entry in plan.fetch:
            ...  # reader.frames(entry, m.version) / reader.read_into(...) as from the store
    """

    def __init__(
        self,
        blobs: BlobStore,
        entries: Sequence[TensorEntry],
        running: Mapping[str, str],
        version: int,
        budget: int = PIPELINE_BYTES,
    ) -> None:
        self.blobs = blobs
        self._ahead: dict[tuple[object, ...], _Ahead] = {}
        self.from_cache = 0  # blobs the host cache served
        shared = blobs if isinstance(blobs, SharedBlobStore) else None
        with contextlib.ExitStack() as held:  # the fill locks this read-ahead claimed
            names: list[str] = []
            caps: list[int] = []
            picked: list[tuple[TensorEntry, bool, int, Slot | None]] = []
            spent = 0
            ns, model = blobs.ns, blobs.model
            for entry in entries:
                ref = entry.delta
                frames = ref is not None and running.get(entry.name) == ref.base
                if frames and ref is not None and reads_backwards(entry) is False:
                    size, blob = ref.stored_bytes, ref.blob
                    more = frame_caps(entry, range(entry.chunks))
                elif ref is None and 0 < entry.nbytes <= SMALL_BLOB_BYTES:
                    size, blob, frames = entry.nbytes, entry.digest, False
                    more = [
                        chunk_span(entry, i)[1] - chunk_span(entry, i)[0]
                        for i in range(entry.chunks)
                    ]
                else:
                    continue
                if spent + size > budget:
                    continue
                slot = None
                if shared is not None and shared.shares(entry, frames):
                    if self._from_cache(shared, entry, version, frames):
                        spent += size
                        continue
                    slot = shared.claim(entry, frames, held)
                    if slot is None:
                        continue  # another agent fetches it now: the store waits for its file
                    # Filled between the first look and the lock?
                    if self._from_cache(shared, entry, version, frames):
                        spent += size
                        continue
                spent += size
                picked.append((entry, frames, len(names), slot))
                names += keys.chunk_keys(ns, model, blob, entry.chunk_bytes, entry.chunks)
                caps += more
            if not names:
                return
            # Anonymous memory: its pages are touched only where values land.
            buf = memoryview(mmap.mmap(-1, sum(caps)))
            got: Got = blobs.call(
                "reading the version's small blobs",
                # All at once: small values, and at most ``budget`` stored bytes in all.
                functools.partial(blobs.get_capped, names, caps, buf, len(names)),
            )
            for entry, frames, first, slot in picked:
                mine = got[first : first + entry.chunks]
                self._ahead[_key(entry, version, frames)] = _Ahead(entry, version, mine)
                if slot is not None and shared is not None:
                    self._keep(shared, slot, entry, version, frames=frames, got=mine)

    def _from_cache(
        self, shared: SharedBlobStore, entry: TensorEntry, version: int, frames: bool
    ) -> bool:
        values = shared.cached(entry, frames)
        if values is None:
            return False
        got: Got = [(v, len(v)) for v in values]
        self._ahead[_key(entry, version, frames)] = _Ahead(entry, version, got)
        self.from_cache += 1
        return True

    def _keep(
        self,
        shared: SharedBlobStore,
        slot: Slot,
        entry: TensorEntry,
        version: int,
        *,
        frames: bool,
        got: Got,
    ) -> None:
        """Store what came from Redis for the host, once it passes the store's checks (a
        read that fails them stores nothing: the agent's own read raises as usual)."""
        where = self._where(version)
        try:
            if frames:
                values = list(checked_frames(where, entry, got))
            else:
                for i, (value, length) in enumerate(got):
                    check_chunk(where, entry, i, length if value is None else len(value))
                values = [v for v, _ in got if v is not None]
        except IntegrityError:
            return
        shared.keep(slot, entry, frames, values)

    @classmethod
    def around(
        cls,
        blobs: Blobs,
        entries: Sequence[TensorEntry],
        running: Mapping[str, str],
        version: int,
    ) -> Blobs:
        """A ``Prefetched`` over ``blobs`` when it is a ``BlobStore`` (plain, or reading
        through the host cache) and something is worth reading ahead; ``blobs`` itself
        otherwise (any other subclass reads its own way)."""
        if not isinstance(blobs, BlobStore) or type(blobs) not in (BlobStore, SharedBlobStore):
            return blobs
        return cls(blobs, entries, running, version)

    def _where(self, version: int | None) -> str:
        return f"model {self.blobs.model!r}" + (f" v{version}" if version is not None else "")

    def _take(self, entry: TensorEntry, version: int | None, frames: bool) -> _Ahead | None:
        # Read once: a route planned again after a failure reads the store.
        return self._ahead.pop(_key(entry, version, frames), None)

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """As ``BlobStore.frames``, from the batch where it was read ahead."""
        ahead = self._take(entry, version, True)
        if ahead is None:
            yield from self.blobs.frames(entry, version)
            return
        where = f"{self._where(version)} tensor {entry.name!r}: delta frame"
        yield from checked_frames(where, entry, ahead.got)

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """As ``BlobStore.read_into``, from the batch where it was read ahead."""
        ahead = self._take(entry, version, False) if len(out) == entry.nbytes else None
        if ahead is None:
            self.blobs.read_into(entry, out, version, on_chunk)
            return
        where = self._where(version)
        for i, (value, length) in enumerate(ahead.got):
            start, end = chunk_span(entry, i)
            check_chunk(where, entry, i, length if value is None else len(value))
            assert value is not None
            out[start:end] = value
            if on_chunk is not None:
                on_chunk(i, end - start)

    def stream(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """As ``BlobStore.stream`` (never read ahead)."""
        return self.blobs.stream(entry, version)
