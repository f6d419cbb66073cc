"""A folder of blobs that the agents of one host share, so Redis serves hosts, not processes.

Imports no Redis: what goes in, and what the bytes must be, are the
caller's (``hotswap.sharedblobs``). One file per blob, named by its content; the first
process that needs a blob takes an exclusive ``flock`` on ``NAME.lock``, reads
the blob (from Redis), writes it to ``NAME.tmp.*`` (named in the lock file
first) and renames that into place, so a reader sees the whole file or none.
The kernel drops a lock when its holder dies, so a filler killed mid-write
blocks nobody: the next process takes the lock, deletes the dead filler's
temporary file and fills the blob itself. Others wait on the lock (at most
``wait`` seconds, then they read Redis themselves) and read the file.

Each file ends with the XXH3-128 of its bytes, written by its filler and
checked by every reader before it hands a byte on: a file damaged in any
way (cut short, a flipped bit) counts as absent and is deleted. XXH3 guards
against accidents, far cheaper than BLAKE3 (docs/scaling.md); the caller
still checks the bytes as it checks bytes from Redis (a full blob against
the manifest's BLAKE3). Trust: the folder must belong to this process's user and be
writable by no one else (0700; files 0600); whoever can still write it can
cost refetches, or get a version refused by the caller's check, never put
other bytes into a model. ``budget`` bytes at most: the least recently used
files go first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import itertools
import logging
import os
import re
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import xxhash

from hotswap.errors import ConfigError

log = logging.getLogger("hotswap.hostcache")

# A blob's file name: letters, digits and dashes only (no path can be spelled).
_NAME = re.compile(r"[A-Za-z0-9-]{1,200}")
# A temporary file's: the blob's, ".tmp.", the filler's process and thread ids.
_TMP = re.compile(r"[A-Za-z0-9-]{1,200}\.tmp\.[0-9]+-[0-9]+")
# The longest pause between two tries of a busy lock: a waiter starts on a
# blob this soon after its filler is done (each try is one system call).
_MAX_POLL = 0.002
# Each file's last bytes: the XXH3-128 of the bytes before them.
_SUM = 16
# How long a listing of the folder stands in for the folder's size: listing
# costs a stat per file, at every fill. Other processes' fills in between can
# run the budget over by what the host fetches in that time.
_LISTING_SECONDS = 0.5

Buffer = bytes | bytearray | memoryview


class HostCache:
    """A host-wide folder of blob files, each filled once by whichever process needs it first.

    Args:
        folder: where the files live; created (0700) if missing. Put it on
            tmpfs (``/dev/shm/...``): the files are read as often as written.
        budget: most bytes of blob files kept; 0 turns filling off.
        wait: seconds ``filling`` waits for another process's fill.
        stop: set, waits end at once (an agent that stops).

    Raises:
        ConfigError: the folder is not a folder of this user, or others may write it.

    Example::

        cache = HostCache("/dev/shm/hotswap", budget=2 << 30)
        out = bytearray(n)
        if not cache.load_into(name, memoryview(out)):
            with cache.filling(name) as slot:
                if not (slot.held and cache.load_into(name, memoryview(out))):
                    out[:] = read_from_redis()
                    slot.publish([out])
    """

    def __init__(
        self,
        folder: str | Path,
        budget: int,
        wait: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.budget = budget
        self.wait = wait
        self.stop = stop or threading.Event()
        # hits, fills, waits, timeouts, busy, discarded, evicted, unwritable: what tests
        # and logs read.
        self.stats: Counter[str] = Counter()
        # The folder's bytes as of its last listing, plus this process's fills since.
        self._estimate: int | None = None
        self._listed_at = 0.0
        self._make_folder()
        self._sweep()

    # -- reading ------------------------------------------------------------------

    def usable(self, name: str, size: int) -> bool:
        """Whether a blob of ``size`` bytes can be stored here as ``name``.

        Names are letters, digits and dashes; a blob over the budget is read
        by each process on its own (waiting for a fill that cannot be stored
        would only take turns).
        """
        return _NAME.fullmatch(name) is not None and size + _SUM <= self.budget

    def load_into(self, name: str, out: memoryview) -> bool:
        """Fill ``out`` from the blob ``name`` if it is stored, ``len(out)`` long and intact.

        False (``out`` then holds anything) for a blob absent or damaged, which is deleted.
        """
        try:
            with io.FileIO(self._path(name), "rb") as f:
                if os.fstat(f.fileno()).st_size != len(out) + _SUM:
                    self.discard(name)
                    return False
                _read_exactly(f, out)
                stored = f.read(_SUM)
        except OSError:  # absent, or the folder gone or unreadable: read Redis
            return False
        return self._intact(name, out, stored)

    def load(self, name: str, most: int) -> memoryview | None:
        """The blob ``name`` if it is stored, at most ``most`` bytes long and intact."""
        try:
            with io.FileIO(self._path(name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not _SUM <= size <= most + _SUM:
                    self.discard(name)
                    return None
                data = memoryview(bytearray(size))
                _read_exactly(f, data)
        except OSError:
            return None
        return data[:-_SUM] if self._intact(name, data[:-_SUM], data[-_SUM:]) else None

    def _intact(self, name: str, data: memoryview, stored: Buffer) -> bool:
        if xxhash.xxh3_128_digest(data) != bytes(stored):
            self.discard(name)
            return False
        self._touch(name)  # eviction goes by last use
        self.stats["hits"] += 1
        return True

    def discard(self, name: str) -> None:
        """Delete the blob ``name``: it failed a reader's check."""
        self.stats["discarded"] += 1
        log.warning("host cache %s: %s failed its check; deleted, read again", self.folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    # -- filling ------------------------------------------------------------------

    @contextlib.contextmanager
    def filling(self, name: str, wait: bool = True) -> Iterator[Slot]:
        """Hold ``name``'s fill lock (``slot.held``), or not once ``wait`` ran out.

        With the lock, look again (another process may have filled the file
        while this one waited), else read the blob and ``slot.publish`` it.
        ``wait=False``: one try, no waiting (another process is filling it
        now: ``held`` is False, counted as ``busy``); a read-ahead that
        claims many blobs at once never waits holding the others.
        """
        try:
            fd = os.open(self._path(name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:  # the folder was removed or made read-only under us
            self._unwritable(name, e)
            yield Slot(self, name, False)
            return
        try:
            held = self._lock(fd, self.wait if wait else 0.0)
            if held:
                # Whoever held the lock before is gone: a temporary file left is a dead fill's.
                self._remove_dead_fill(fd, name)
            else:
                self.stats["timeouts" if wait else "busy"] += 1
            yield Slot(self, name, held, fd)
        finally:
            os.close(fd)  # also drops the lock

    def _lock(self, fd: int, wait: float) -> bool:
        deadline, pause, waited = time.monotonic() + wait, 0.001, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not wait:
                    return False
                if not waited:
                    self.stats["waits"] += 1
                    waited = True
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.wait(min(pause, left)):
                return False
            pause = min(pause * 2, _MAX_POLL)

    def _remove_dead_fill(self, lock: int, name: str) -> None:
        """Delete the temporary file the last holder of ``lock`` named in it (``_write``).

        Read from the lock file, not by listing the folder: a listing at each
        fill costs a stat per file the folder holds, and it holds every blob
        of the versions kept. A holder that names no file (one of an earlier
        release) is left to ``_sweep``.
        """
        try:
            tmp = os.pread(lock, 256, 0).decode("ascii", "replace")
        except OSError:
            return
        if _TMP.fullmatch(tmp) and tmp.startswith(name + ".tmp."):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(tmp))

    def _publish(self, name: str, pieces: Sequence[Buffer], lock: int) -> bool:
        """Write ``pieces`` as the file ``name``, whole or not at all."""
        size = sum(memoryview(p).nbytes for p in pieces) + _SUM
        try:
            if not self._make_room(size, name, self.budget):
                return False
            try:
                self._write(name, pieces, lock)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # The file system is smaller than the budget (a container's 64 MiB
                # /dev/shm): the oldest files make way, once.
                self._make_room(size, name, self.size())
                self._write(name, pieces, lock)
        except OSError as e:
            self._unwritable(name, e)
            return False
        self.stats["fills"] += 1
        return True

    def _unwritable(self, name: str, e: OSError) -> None:
        self.stats["unwritable"] += 1
        level = logging.DEBUG if self.stats["unwritable"] > 1 else logging.WARNING
        log.log(level, "host cache %s: cannot store %s (%s); reading Redis", self.folder, name, e)

    def _write(self, name: str, pieces: Sequence[Buffer], lock: int) -> None:
        base = f"{name}.tmp.{os.getpid()}-{threading.get_ident()}"
        # Named in the lock file before it exists: if this process dies before the
        # rename, the next holder of the lock deletes it (``_remove_dead_fill``).
        os.ftruncate(lock, 0)
        os.pwrite(lock, base.encode("ascii"), 0)
        tmp = self._path(base)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                summed = xxhash.xxh3_128()
                for piece in itertools.chain(pieces, [None]):
                    if piece is None:  # after the bytes, their sum
                        view = memoryview(summed.digest())
                    else:
                        view = memoryview(piece).cast("B")
                        summed.update(view)
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, self._path(name))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # Named only while it is being written: an empty lock file takes no page.
        with contextlib.suppress(OSError):
            os.ftruncate(lock, 0)
        self._touch(name)

    # -- budget -------------------------------------------------------------------

    def size(self) -> int:
        """Bytes of blob files in the folder now (their sums included)."""
        return sum(size for _, _, size in self._files())

    def _make_room(self, size: int, name: str, limit: int) -> bool:
        """Delete the least recently used files until ``size`` more bytes fit in ``limit``."""
        if size > limit:
            return False
        if self._used_on_file_system() + size <= limit:
            return True  # the whole file system holds less: so does the folder
        fresh = time.monotonic() - self._listed_at < _LISTING_SECONDS
        if fresh and self._estimate is not None and self._estimate + size <= limit:
            self._estimate += size
            return True
        # Eviction goes by a fresh listing, least recently used first.
        files = sorted(self._files())
        self._listed_at = time.monotonic()
        total = sum(s for _, _, s in files)
        for _, old, s in files:
            if total + size <= limit:
                break
            if old == name:
                continue
            for path in (old, old + ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(path))
            total -= s
            self.stats["evicted"] += 1
        self._estimate = total + size
        return total + size <= limit

    def _used_on_file_system(self) -> int:
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return 1 << 62  # unknown: list the folder
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _files(self) -> list[tuple[int, str, int]]:
        """(last used, name, bytes) of every blob file (names without a dot)."""
        found = []
        with os.scandir(self.folder) as it:
            for e in it:
                if "." in e.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, e.name, st.st_size))
        return found

    # -- housekeeping -------------------------------------------------------------

    def _touch(self, name: str) -> None:
        # The clock's own nanoseconds: the file system's timestamps can be
        # coarser than the gap between two uses, and eviction goes by them.
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._path(name), ns=(now, now))

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _remove_temporaries(self, name: str) -> None:
        try:
            with os.scandir(self.folder) as it:
                dead = [e.name for e in it if e.name.startswith(name + ".tmp.")]
        except OSError:
            return
        for tmp in dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(tmp))

    def _sweep(self) -> None:
        """Delete what dead fills left: temporary files, and locks of blobs never stored.

        Only under the blob's lock, so a live fill keeps both (a lock deleted
        while another process waits on it costs at most one more fetch).
        """
        with os.scandir(self.folder) as it:
            found = [e.name for e in it]
        present = set(found)
        names = {n.split(".tmp.")[0] for n in found if ".tmp." in n}
        names |= {n[: -len(".lock")] for n in found if n.endswith(".lock")}
        for name in names:
            fd = os.open(self._path(name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._remove_temporaries(name)
                if name not in present:
                    os.unlink(self._path(name + ".lock"))
            except (BlockingIOError, FileNotFoundError):
                pass  # a live fill, or another process swept it first
            finally:
                os.close(fd)

    def _make_folder(self) -> None:
        where = f"HOTSWAP_HOST_CACHE_DIR={str(self.folder)!r}"
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.folder)
        except OSError as e:
            raise ConfigError(f"{where}: cannot create it ({e}); fix or unset it") from e
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{where} is not a folder (a link or a file); name a folder")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"{where} belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}: "
                "agents share a cache only under one user; name a folder of this user"
            )
        if st.st_mode & 0o022:
            raise ConfigError(
                f"{where} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                f"run `chmod 700 {self.folder}`"
            )


def _read_exactly(f: io.FileIO, out: memoryview) -> None:
    have = 0
    while have < len(out):
        got = f.readinto(out[have:])
        if not got:
            return  # the file shrank under us: the sum will not match
        have += got


class Slot:
    """A fill in progress (``HostCache.filling``): ``held`` says whether this process may fill."""

    def __init__(self, cache: HostCache, name: str, held: bool, lock: int = -1) -> None:
        self.cache, self.name, self.held, self.lock = cache, name, held, lock

    def publish(self, pieces: Sequence[Buffer]) -> bool:
        """Store ``pieces``, in order, as the blob's file (only with the lock held).

        Returns:
            Whether the file is in place (False: over the budget, or the
            folder refused the write; the caller has the bytes anyway).
        """
        return self.held and self.cache._publish(self.name, pieces, self.lock)
