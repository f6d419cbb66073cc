"""One process of a host sharing blobs (test_hostcache.py), run as its own Python process.

    python tests/hostcache_worker.py REDIS_URL CACHE_DIR MODEL VERSION read|stall

``read``: reads every blob of VERSION through a ``SharedBlobStore`` (full
blobs with ``read_into``, delta blobs with ``frames``) once stdin says ``GO``,
and prints one JSON line: each tensor's BLAKE3 of what it read, the cache's
counters. ``stall``: takes the fill lock of the first tensor's blob, writes
half of its bytes to the temporary file a fill writes, prints ``WRITING`` and
blocks (the test kills it there). Prints ``READY`` once set up, before either.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

import blake3
import redis

from hotswap import codec
from hotswap.blobs import BlobStore
from hotswap.connection import operation_retry
from hotswap.hostcache import Buffer, HostCache
from hotswap.sharedblobs import SharedBlobStore
from hotswap.store import Store


class _Stalling(Sequence[Buffer]):
    """Two pieces; handing out the second one for writing blocks forever."""

    def __init__(self, half: memoryview, rest: memoryview) -> None:
        self.pieces, self.handed = [half, rest], 0

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Buffer:  # type: ignore[override]
        if i == 1:
            self.handed += 1
            if self.handed == 2:  # the first time is the size count, the second the write
                print("WRITING", flush=True)
                sys.stdin.readline()
        return self.pieces[i]

    def __iter__(self) -> Iterator[Buffer]:
        return (self[i] for i in range(2))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("cache_dir")
    parser.add_argument("model")
    parser.add_argument("version", type=int)
    parser.add_argument("mode", choices=["read", "stall"])
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url, socket_timeout=10)
    store = Store(client, args.model, retrying=operation_retry(3, 0.1))
    entries = list(store.manifest(args.version).by_name().values())
    cache = HostCache(args.cache_dir, budget=1 << 30, wait=60)
    blobs = SharedBlobStore.around(BlobStore(client, args.model), cache)
    print("READY", flush=True)
    if args.mode == "stall":
        entry = next(e for e in entries if e.delta is None)
        data = bytearray(entry.nbytes)
        BlobStore(client, args.model).read_into(entry, memoryview(data))
        half = entry.nbytes // 2
        with cache.filling(f"b-{entry.digest}-{entry.nbytes}") as slot:
            assert slot.held
            slot.publish(_Stalling(memoryview(data)[:half], memoryview(data)[half:]))
        return 1  # never reached: killed while writing
    sys.stdin.readline()  # GO
    read: dict[str, str] = {}
    for e in entries:
        if e.delta is None:
            out = bytearray(e.nbytes)
            blobs.read_into(e, memoryview(out), args.version)
            read[e.name] = codec.digest(out)
        else:
            hasher = blake3.blake3()
            for frame in blobs.frames(e, args.version):
                hasher.update(frame)
            read[e.name] = hasher.hexdigest()
    print(json.dumps({"read": read, "stats": dict(cache.stats)}), flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
