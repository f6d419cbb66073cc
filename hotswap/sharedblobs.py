"""Blob reads shared by the agents of one host (``HOTSWAP_HOST_CACHE_DIR``).

``share`` turns an agent's ``BlobStore`` into a ``SharedBlobStore``: full
blobs and delta frames are read from the host's cache folder
(``hotswap.hostcache``) when another agent of the host already fetched them,
and fetched from Redis once, by whichever agent needs them first, when not.
The folder hands on only files whose checksum holds (``HostCache``); a file
that fails it is deleted and the blob read from Redis. The agent then checks
the bytes as it checks bytes from Redis (a full blob's BLAKE3 against the
manifest, a delta's frames against the digests the manifest signs). A
filler stores a full blob only once it matched the manifest's digest.
``stream`` (``hotswap verify``) always reads Redis.

The agent's read-ahead of a version's small blobs (``hotswap.prefetch``)
asks the host cache first (``cached``), claims the fill of each blob it
then reads from Redis without waiting for any (``claim``: a blob another
agent is filling now is left to ``frames``/``read_into``, which wait for
its file), reads the claimed ones in one round trip and stores them
(``keep``) under the same rules, so that Redis still sends each blob once
per host.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from hotswap import codec
from hotswap.blobs import BlobStore
from hotswap.blobwrite import chunk_span
from hotswap.manifest import TensorEntry
from hotswap.settings import HotswapSettings

if TYPE_CHECKING:  # imported when sharing is on: fcntl is POSIX's
    from hotswap.hostcache import Buffer, HostCache, Slot

# A delta blob's file: magic, frame count, each frame's length, the frames.
_FRAMES_MAGIC = b"HSF1"


def share(
    blobs: BlobStore, settings: HotswapSettings, stop: threading.Event | None = None
) -> BlobStore:
    """``blobs`` reading through the host cache that ``settings`` names, or as is when none.

    Args:
        blobs: the agent's blob store.
        settings: ``host_cache_dir`` (unset: ``blobs`` comes back), ``host_cache_bytes``,
            ``host_cache_wait``.
        stop: set when the agent stops: waiting for another agent's fill ends.

    Raises:
        ConfigError: the folder cannot be used (see ``HostCache``).

    Example::

        store.blobs = share(store.blobs, HotswapSettings(host_cache_dir="/dev/shm/hotswap"))
    """
    if not settings.host_cache_dir:
        return blobs
    from hotswap.hostcache import HostCache

    cache = HostCache(
        settings.host_cache_dir,
        settings.host_cache_bytes,
        wait=settings.host_cache_wait,
        stop=stop,
    )
    return SharedBlobStore.around(blobs, cache)


class SharedBlobStore(BlobStore):
    """A ``BlobStore`` whose full-blob and delta-frame reads go through a ``HostCache``.

    Build it with ``around`` (or ``share``); everything else is the wrapped store's.
    """

    cache: HostCache

    @classmethod
    def around(cls, blobs: BlobStore, cache: HostCache) -> SharedBlobStore:
        """The same store (client, names, retry policy, whatever else it was built with)
        reading through ``cache``."""
        shared = cls.__new__(cls)
        vars(shared).update(vars(blobs))
        shared.cache = cache
        return shared

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """As ``BlobStore.read_into``; the host's copy when it checks out, else Redis once."""
        name, _ = _name_size(entry, False)
        if len(out) != entry.nbytes or not entry.chunks or not self.cache.usable(name, len(out)):
            super().read_into(entry, out, version, on_chunk)
            return
        if self._cached_into(name, entry, out, on_chunk):
            return
        with self.cache.filling(name) as slot:
            if slot.held and self._cached_into(name, entry, out, on_chunk):
                return
            mine = codec.ChunkDigest(out, entry.chunk_bytes)

            def landed(i: int, length: int) -> None:
                mine.landed(i, length)
                if on_chunk is not None:
                    on_chunk(i, length)

            super().read_into(entry, out, version, landed)
            # Only bytes that are the blob go in: a bad read fails the caller's check alone.
            if slot.held and mine.hexdigest() == entry.digest:
                slot.publish([out])

    # -- the read-ahead's side (``hotswap.prefetch``) --------------------------------

    def shares(self, entry: TensorEntry, frames: bool) -> bool:
        """Whether ``entry``'s blob (its delta's frames with ``frames``) goes through the cache."""
        return bool(entry.chunks) and self.cache.usable(*_name_size(entry, frames))

    def cached(self, entry: TensorEntry, frames: bool) -> list[memoryview] | None:
        """The blob's chunks (``frames``: its delta's frames), in order, from the host
        cache; None unless it is stored there and intact. Call only where ``shares``."""
        name, _ = _name_size(entry, frames)
        if frames:
            return self._cached_frames(name, entry)
        out = memoryview(bytearray(entry.nbytes))
        if not self.cache.load_into(name, out):
            return None
        return [out[slice(*chunk_span(entry, i))] for i in range(entry.chunks)]

    def claim(self, entry: TensorEntry, frames: bool, held: contextlib.ExitStack) -> Slot | None:
        """The blob's fill lock, held until ``held`` closes, or None at once if another
        process holds it (it is filling the blob: read it with ``frames``/``read_into``,
        which wait for the file). Look at ``cached`` again once it is held."""
        name, _ = _name_size(entry, frames)
        slot = held.enter_context(self.cache.filling(name, wait=False))
        return slot if slot.held else None

    def keep(
        self, slot: Slot, entry: TensorEntry, frames: bool, values: Sequence[memoryview]
    ) -> None:
        """Store the blob read from Redis under ``slot``: frames that passed the store's
        checks (``blobs.checked_frames``) as they are, a full blob's chunks only if
        together they are the blob the manifest names (its BLAKE3)."""
        if frames:
            slot.publish(_pack([bytes(v) for v in values]))
            return
        data = memoryview(bytearray(entry.nbytes))
        mine = codec.ChunkDigest(data, entry.chunk_bytes)
        for i, value in enumerate(values):
            start, end = chunk_span(entry, i)
            if len(value) != end - start:
                return
            data[start:end] = value
            mine.landed(i, end - start)
        if mine.hexdigest() == entry.digest:
            slot.publish([data])

    def _cached_into(
        self,
        name: str,
        entry: TensorEntry,
        out: memoryview,
        on_chunk: Callable[[int, int], None] | None,
    ) -> bool:
        if not self.cache.load_into(name, out):
            return False
        if on_chunk is not None:
            for i in range(entry.chunks):
                on_chunk(i, min(entry.chunk_bytes, entry.nbytes - i * entry.chunk_bytes))
        return True

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        """As ``BlobStore.frames``; the host's copy when it checks out, else Redis once.

        Holds the delta blob's frames in memory (``stored_bytes``) while they are read.
        """
        ref = entry.delta
        name, size = _name_size(entry, True)
        if ref is None or not entry.chunks or not self.cache.usable(name, size):
            yield from super().frames(entry, version)
            return
        found = self._cached_frames(name, entry)
        if found is None:
            found = self._fill_frames(name, entry, version)
        if found is None:
            yield from super().frames(entry, version)
            return
        yield from found

    def _cached_frames(self, name: str, entry: TensorEntry) -> list[memoryview] | None:
        ref = entry.delta
        assert ref is not None
        data = self.cache.load(name, _framed_size(entry.chunks, ref.stored_bytes))
        if data is None:
            return None
        found = _unpack(data, entry.chunks, ref.stored_bytes)
        if found is None:
            self.cache.discard(name)
        return found

    def _fill_frames(
        self, name: str, entry: TensorEntry, version: int | None
    ) -> list[memoryview] | None:
        """The frames from the file another agent filled meanwhile, or read from Redis
        and stored; None: this agent did not get the fill (read them as usual)."""
        ref = entry.delta
        assert ref is not None
        with self.cache.filling(name) as slot:
            if not slot.held:
                return None
            found = self._cached_frames(name, entry)
            if found is not None:
                return found
            # A bad frame raises here, where reading it from Redis would.
            frames = [bytes(f) for f in super().frames(entry, version)]
            packed = _pack(frames)
            slot.publish(packed)
            return [memoryview(f) for f in frames]


def _name_size(entry: TensorEntry, frames: bool) -> tuple[str, int]:
    """The cache's name for ``entry``'s blob (``frames``: its delta's), and its size."""
    ref = entry.delta
    if frames and ref is not None:
        name = f"d-{ref.blob}-{entry.chunk_bytes}-{entry.chunks}"
        return name, _framed_size(entry.chunks, ref.stored_bytes)
    return f"b-{entry.digest}-{entry.nbytes}", entry.nbytes


def _framed_size(count: int, stored: int) -> int:
    return len(_FRAMES_MAGIC) + 4 * (count + 1) + stored


def _pack(frames: list[bytes]) -> list[Buffer]:
    head = _FRAMES_MAGIC + struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames))
    return [head, *frames]


def _unpack(view: memoryview, count: int, stored: int) -> list[memoryview] | None:
    """The frames of a delta blob's file, None unless it is the blob expected."""
    if len(view) != _framed_size(count, stored) or view[: len(_FRAMES_MAGIC)] != _FRAMES_MAGIC:
        return None
    fields = struct.unpack_from(f"<I{count}I", view, len(_FRAMES_MAGIC))
    if fields[0] != count or sum(fields[1:]) != stored:
        return None
    frames, at = [], len(_FRAMES_MAGIC) + 4 * (count + 1)
    for length in fields[1:]:
        frames.append(view[at : at + length])
        at += length
    return frames
