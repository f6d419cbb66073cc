"""Host memory for staging a CPU model's new bytes: one arena per version, kept or not.

An arena is fresh anonymous memory faulted in with one ``MADV_POPULATE_WRITE``
(cheaper than taking the same page faults one by one while data arrives),
in a thread of its own while the fetch already writes into the arena.
``HostMemory`` keeps the last arena between versions up to a byte budget, and
lets the kernel reclaim a kept arena under memory pressure (``MADV_FREE``)
while it is not in use. Linux calls where they exist; plain torch memory
elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
from typing import Any

import torch

from hotswap.errors import ConfigError

MiB = 1024 * 1024
# Below this an arena is plain torch memory (the allocator's warm heap).
ARENA_MIN_BYTES = 4 * MiB
# <linux/mman.h>; Python's mmap module does not name it.
MADV_POPULATE_WRITE = 23


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise`` (it releases the GIL while the kernel works), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(buf: torch.Tensor) -> bool:
    """Fault in a page-aligned host buffer's pages now, in one call; False where unsupported.

    One ``MADV_POPULATE_WRITE`` (Linux 5.14+) costs less than taking the same
    faults one by one while data arrives, and runs without the GIL.
    """
    fn = _madvise()
    if fn is None or buf.numel() == 0:
        return False
    return int(fn(buf.data_ptr(), buf.numel(), MADV_POPULATE_WRITE)) == 0


def lazy_free(buf: torch.Tensor) -> bool:
    """Let the kernel take a kept arena's pages back under memory pressure; False where unsupported.

    ``MADV_FREE``: until the kernel needs the memory the pages stay in place
    (a later ``populate`` finds them, far cheaper than faulting in fresh
    ones; docs/performance.md), and once it does they are dropped without
    swap. Only for memory of ``anonymous`` that nothing reads until it is
    written again.
    """
    fn, advice = _madvise(), getattr(mmap, "MADV_FREE", None)
    if fn is None or advice is None or buf.numel() == 0:
        return False
    return int(fn(buf.data_ptr(), buf.numel(), advice)) == 0


def anonymous(nbytes: int, *, fill_behind: bool = False) -> torch.Tensor:
    """``nbytes`` of memory fresh from the kernel, faulted in.

    Populating the whole range in one call costs less than taking the same
    page faults one by one while chunks arrive. With ``fill_behind`` it is
    returned at once and a thread populates it (``populate_behind``) while
    the caller writes. Transparent huge pages are left to the system's
    setting: advising them was slower on a first mapping and made the
    agent's whole fetch slower (docs/performance.md). Falls back to
    ``torch.empty`` where anonymous mappings do not exist.
    """
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` mapped
    if not fill_behind:
        populate(arena)
    return arena


def populate_behind(buf: torch.Tensor) -> threading.Thread | None:
    """Start faulting in ``buf``'s pages in a thread; None where ``populate`` is unsupported.

    The fetch writes into the arena from its first byte while the thread
    runs ahead of it (whoever touches a page first faults it; populating
    never changes a page's contents), so a fetch into a fresh arena waits
    for neither a populate up front nor a fault per page (figures in
    docs/performance.md). The thread holds ``buf``, so the mapping outlives
    it.
    """
    if _madvise() is None or buf.numel() == 0:
        return None
    thread = threading.Thread(target=populate, args=(buf,), name="hotswap-populate", daemon=True)
    thread.start()
    return thread


class HostMemory:
    """Host staging memory for CPU models, kept between versions up to ``keep_bytes``
    (None: the last arena, whatever its size).

    A version's host-staged tensors are slices of one arena taken here, and
    ``give`` returns it once they were applied or dropped. The next version
    reuses a kept arena that is big enough (its pages are already faulted
    in); ``keep_bytes=0`` keeps nothing, so memory is only held while a
    version is staged. At rest a kept arena is lazily freed (``lazy_free``):
    still counted in the process's RSS, but the kernel may reclaim it under
    memory pressure instead of swapping or killing anything.
    """

    def __init__(self, keep_bytes: int | None = 0) -> None:
        if keep_bytes is not None and keep_bytes < 0:
            raise ConfigError(f"staging keep_bytes must be >= 0, not {keep_bytes}")
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._kept: torch.Tensor | None = None
        # Fresh arenas still being faulted in, by address.
        self._filling: dict[int, threading.Thread] = {}

    @property
    def kept_bytes(self) -> int:
        """Bytes held between versions now."""
        kept = self._kept
        return 0 if kept is None else kept.numel()

    def take(self, nbytes: int) -> torch.Tensor:
        """An arena of at least ``nbytes`` (uint8), for one version's staged tensors."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None and kept.numel() >= nbytes:
            if kept.numel() >= ARENA_MIN_BYTES and nbytes:
                # Pages the kernel took back fault in again, in one call; only
                # the part this version uses (a 4 KiB update after a 64 MiB one
                # need not touch 64 MiB).
                populate(kept[:nbytes])
            return kept
        # Too small: unmapped before the new arena is, so the peak stays one arena.
        del kept
        if nbytes < ARENA_MIN_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8)
        arena = anonymous(nbytes, fill_behind=True)
        filling = populate_behind(arena)
        if filling is not None:
            with self._lock:
                self._filling[arena.data_ptr()] = filling
        return arena

    def give(self, arena: torch.Tensor, used: int | None = None) -> None:
        """Take back an arena nothing uses any more; kept if within budget and largest.

        ``used``: how many of its leading bytes were written since it was
        taken (the rest is still as lazily freed as before).
        """
        with self._lock:
            filling = self._filling.pop(arena.data_ptr(), None)
        if filling is not None:
            # Pages it faults in after the advice below would no longer be lazily free.
            filling.join()
        if self.keep_bytes is not None and arena.numel() > self.keep_bytes:
            return
        # Before it can be taken: advised after a taker began writing into it,
        # the kernel could drop pages already fetched and checked. Arenas this
        # large come from ``anonymous`` wherever it exists; a ``torch.empty``
        # one belongs to an allocator and is left alone.
        if arena.numel() >= ARENA_MIN_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
            lazy_free(arena if used is None else arena[:used])
        with self._lock:
            if self._kept is None or self._kept.numel() < arena.numel():
                self._kept = arena

    def clear(self) -> None:
        """Drop what is kept."""
        with self._lock:
            self._kept = None
