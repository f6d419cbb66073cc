"""The host cache (hotswap.hostcache, hotswap.sharedblobs): one fetch per host, never wrong bytes.

Processes of one host are real processes (tests/hostcache_worker.py) against a
real redis-server; Redis's own count of GET calls says how often each chunk
was fetched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import pytest
import redis
import torch
import xxhash
from agent_support import Ten, bump, cloned, equal_state, snapshot

from hotswap import codec
from hotswap.agent import Agent
from hotswap.blobs import BlobStore
from hotswap.errors import ConfigError, ValidationError
from hotswap.hostcache import HostCache
from hotswap.manifest import TensorEntry
from hotswap.settings import HotswapSettings
from hotswap.sharedblobs import SharedBlobStore, share
from hotswap.store import Store
from publisher.publisher import Publisher

WORKER = Path(__file__).with_name("hostcache_worker.py")
ROOT = WORKER.parent.parent
MODEL = "shared"
SUM = 16  # each cache file ends with the XXH3-128 of its bytes


def get_calls(client: redis.Redis) -> int:
    """GET commands the server has run (INFO commandstats)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 256 KiB: 4 chunks of 64 KiB; the others one short chunk each.
    return {
        "a": torch.randn(256, 256, generator=g),
        "b": torch.randn(100, generator=g),
        "c": torch.randn(64, 64, generator=g),
    }


def publish(settings: HotswapSettings, *states: dict[str, torch.Tensor]) -> int:
    pub = Publisher(MODEL, settings=settings)
    try:
        return [pub.publish(s) for s in states][-1]
    finally:
        pub.close()


def entries(client: redis.Redis, version: int) -> dict[str, TensorEntry]:
    return Store(client, MODEL).manifest(version).by_name()


@contextmanager
def workers(
    url: str, folder: Path, version: int, mode: str, n: int
) -> Iterator[list[subprocess.Popen[str]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(WORKER), url, str(folder), MODEL, str(version), mode]
    procs = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "READY", p.stderr.read() if p.stderr else line
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


def results(procs: list[subprocess.Popen[str]]) -> list[dict[str, dict[str, object]]]:
    for p in procs:  # every process starts reading at once
        assert p.stdin is not None
        p.stdin.write("GO\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def expected_reads(client: redis.Redis, version: int) -> dict[str, str]:
    """What a plain BlobStore reads: full blobs' digests, delta frames' BLAKE3."""
    plain = BlobStore(client, MODEL)
    read = {}
    for name, e in entries(client, version).items():
        if e.delta is None:
            read[name] = e.digest
        else:
            hasher = blake3.blake3()
            for frame in plain.frames(e, version):
                hasher.update(frame)
            read[name] = hasher.hexdigest()
    return read


def shared(
    client: redis.Redis, folder: Path, budget: int = 1 << 30, wait: float = 60
) -> SharedBlobStore:
    return SharedBlobStore.around(BlobStore(client, MODEL), HostCache(folder, budget, wait=wait))


def read(blobs: BlobStore, e: TensorEntry) -> str:
    out = bytearray(e.nbytes)
    blobs.read_into(e, memoryview(out))
    return codec.digest(out)


def blob_file(folder: Path, e: TensorEntry) -> Path:
    return folder / f"b-{e.digest}-{e.nbytes}"


def stored(path: Path) -> str:
    """BLAKE3 of the blob a cache file holds (its last 16 bytes are its checksum)."""
    return blake3.blake3(path.read_bytes()[:-SUM]).hexdigest()


def test_processes_of_one_host_fetch_each_blob_once(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    first = state()
    second = {**first, "a": first["a"].clone()}
    second["a"].view(-1)[::9000] += 1.0  # a few elements: stored as a delta
    version = publish(settings, first, second)
    read_of = entries(client, version)
    assert read_of["a"].delta is not None and read_of["b"].delta is None
    chunks = sum(e.chunks for e in read_of.values())
    folder = tmp_path / "cache"
    with workers(settings.redis_url, folder, version, "read", 3) as procs:
        before = get_calls(client)
        got = results(procs)
        fetched = get_calls(client) - before
    assert fetched == chunks  # each chunk once, for three processes
    expected = expected_reads(client, version)
    assert [r["read"] for r in got] == [expected] * 3
    fills = sum(int(r["stats"].get("fills", 0)) for r in got)  # type: ignore[union-attr]
    hits = sum(int(r["stats"].get("hits", 0)) for r in got)  # type: ignore[union-attr]
    assert (fills, hits) == (len(read_of), 2 * len(read_of))
    assert sorted(p.name for p in folder.iterdir() if ".tmp." in p.name) == []
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o600"}


def test_a_filler_killed_mid_write_leaves_no_file_and_the_next_process_fills_it(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    version = publish(settings, state())
    read_of = entries(client, version)
    first = next(iter(read_of.values()))
    folder = tmp_path / "cache"
    with workers(settings.redis_url, folder, version, "stall", 1) as (stalled,):
        assert stalled.stdout is not None
        assert stalled.stdout.readline().strip() == "WRITING"
        stalled.send_signal(signal.SIGKILL)
        assert stalled.wait() == -signal.SIGKILL
    partial = [p for p in folder.iterdir() if ".tmp." in p.name]
    assert [p.stat().st_size for p in partial] == [first.nbytes // 2]  # left behind, unseen
    assert not blob_file(folder, first).exists()
    with workers(settings.redis_url, folder, version, "read", 1) as procs:
        before = get_calls(client)
        (got,) = results(procs)
        fetched = get_calls(client) - before
    assert got["read"] == {n: e.digest for n, e in read_of.items()}
    assert fetched == sum(e.chunks for e in read_of.values())
    assert got["stats"]["fills"] == len(read_of)
    assert [p for p in folder.iterdir() if ".tmp." in p.name] == []
    assert stored(blob_file(folder, first)) == first.digest


def test_a_corrupted_file_is_read_again_from_redis(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    first = state()
    second = {**first, "a": first["a"].clone()}
    second["a"].view(-1)[::9000] += 1.0
    version = publish(settings, first, second)
    read_of = entries(client, version)
    full, delta = read_of["c"], read_of["a"]
    folder = tmp_path / "cache"
    expected = expected_reads(client, version)
    filler = shared(client, folder)
    assert read(filler, full) == full.digest
    assert blake3.blake3(b"".join(filler.frames(delta, version))).hexdigest() == expected["a"]
    (frames_file,) = folder.glob("d-*[0-9]")
    for path in (blob_file(folder, full), frames_file):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, same length: only a check can tell
        path.write_bytes(bytes(data))
    reader = shared(client, folder)
    before = get_calls(client)
    assert read(reader, full) == full.digest
    assert blake3.blake3(b"".join(reader.frames(delta, version))).hexdigest() == expected["a"]
    assert get_calls(client) - before == full.chunks + delta.chunks
    assert (reader.cache.stats["discarded"], reader.cache.stats["fills"]) == (2, 2)
    # Filled again with the right bytes: the next reader fetches nothing.
    assert stored(blob_file(folder, full)) == full.digest
    before = get_calls(client)
    assert read(shared(client, folder), full) == full.digest
    assert get_calls(client) == before
    # Cut short: refused as well.
    blob_file(folder, full).write_bytes(blob_file(folder, full).read_bytes()[:100])
    before = get_calls(client)
    assert read(shared(client, folder), full) == full.digest
    assert get_calls(client) - before == full.chunks


def test_the_budget_keeps_the_most_recently_used_blobs(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(8192, generator=g) for n in ("x", "y", "z")}  # 32 KiB each
    read_of = entries(client, publish(settings, tensors))
    x, y, z = (read_of[n] for n in ("x", "y", "z"))
    folder = tmp_path / "cache"
    blobs = shared(client, folder, budget=2 * (x.nbytes + SUM) + 10)
    assert read(blobs, x) == x.digest and read(blobs, y) == y.digest
    assert read(blobs, x) == x.digest  # x used after y: y is the least recently used
    assert read(blobs, z) == z.digest
    assert (blob_file(folder, x).exists(), blob_file(folder, y).exists()) == (True, False)
    assert (
        blob_file(folder, z).exists()
        and not (folder / f"{blob_file(folder, y).name}.lock").exists()
    )
    assert blobs.cache.size() == 2 * (x.nbytes + SUM) <= blobs.cache.budget
    assert blobs.cache.stats["evicted"] == 1
    before = get_calls(client)
    assert read(blobs, y) == y.digest
    assert get_calls(client) - before == y.chunks
    # A blob over the whole budget is read, not stored.
    small = shared(client, tmp_path / "small", budget=x.nbytes - 1)
    assert read(small, x) == x.digest
    assert list((tmp_path / "small").iterdir()) == []  # nor waited for: no lock either
    assert small.cache.stats["fills"] == 0


def test_a_folder_removed_under_the_agents_costs_reads_from_redis_only(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    read_of = entries(client, publish(settings, state()))
    folder = tmp_path / "cache"
    blobs = shared(client, folder)
    assert read(blobs, read_of["a"]) == read_of["a"].digest
    shutil.rmtree(folder)
    before = get_calls(client)
    assert read(blobs, read_of["a"]) == read_of["a"].digest
    assert read(blobs, read_of["c"]) == read_of["c"].digest
    assert get_calls(client) - before == read_of["a"].chunks + read_of["c"].chunks
    assert blobs.cache.stats["unwritable"] == 2
    assert not folder.exists()


def test_a_reader_that_waits_too_long_reads_redis_itself(
    client: redis.Redis, settings: HotswapSettings, server: object, tmp_path: Path
) -> None:
    x = entries(client, publish(settings, state()))["a"]
    folder = tmp_path / "cache"
    holder = HostCache(folder, 1 << 30)
    with holder.filling(blob_file(folder, x).name) as slot:
        assert slot.held
        impatient = shared(client, folder, wait=0)
        before = get_calls(client)
        assert read(impatient, x) == x.digest
        assert get_calls(client) - before == x.chunks
        assert impatient.cache.stats["timeouts"] == 1
        assert not blob_file(folder, x).exists()  # only the lock's holder fills


def test_a_planted_file_with_a_valid_checksum_gets_the_version_refused_never_applied(
    settings: HotswapSettings, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    model = Ten()
    v1 = cloned(model)
    pub = Publisher(MODEL, settings=settings)
    pub.publish(v1)
    v2 = bump(v1)
    name = "layers.0.weight"
    data = codec.as_bytes(v2[name])
    wrong = bytes(b ^ 0xFF for b in data)  # other bytes, under v2's name, checksum right
    folder.mkdir(mode=0o700)
    (folder / f"b-{codec.digest(data)}-{len(data)}").write_bytes(
        wrong + xxhash.xxh3_128_digest(wrong)
    )
    cached = settings.model_copy(update={"host_cache_dir": str(folder)})
    with Agent(model, MODEL, settings=cached) as agent:
        assert agent.wait_for(1, timeout=30)
        before = snapshot(model)
        assert pub.publish(v2) == 2
        with pytest.raises(ValidationError) as e:
            agent.wait_for(2, timeout=30)
        assert "bytes hash to" in str(e.value) and name in str(e.value)
        assert snapshot(model) == before and equal_state(model, v1)
    pub.close()


def test_an_agent_reading_a_damaged_file_applies_the_version_from_redis(
    client: redis.Redis, settings: HotswapSettings, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    model = Ten()
    v1 = cloned(model)
    pub = Publisher(MODEL, settings=settings)
    pub.publish(v1)
    v2 = bump(v1)
    name = "layers.0.weight"
    data = bytes(codec.as_bytes(v2[name]))
    damaged = bytearray(data + xxhash.xxh3_128_digest(data))
    damaged[7] ^= 0x10  # one bit of the blob: its checksum no longer holds
    folder.mkdir(mode=0o700)
    (folder / f"b-{codec.digest(data)}-{len(data)}").write_bytes(bytes(damaged))
    cached = settings.model_copy(update={"host_cache_dir": str(folder)})
    with Agent(model, MODEL, settings=cached) as agent:
        assert agent.wait_for(1, timeout=30)
        assert pub.publish(v2) == 2
        assert agent.wait_for(2, timeout=30)
        assert equal_state(model, v2)
    pub.close()
    # Filled again by the agent, with the right bytes.
    assert stored(folder / f"b-{codec.digest(data)}-{len(data)}") == codec.digest(data)


def test_a_file_system_smaller_than_the_budget_makes_room_for_the_newest(
    client: redis.Redis,
    settings: HotswapSettings,
    server: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(4)
    tensors = {n: torch.randn(8192, generator=g) for n in ("x", "y", "z")}  # 32 KiB each
    read_of = entries(client, publish(settings, tensors))
    x, y, z = (read_of[n] for n in ("x", "y", "z"))
    folder = tmp_path / "cache"
    room = 2 * (x.nbytes + SUM) + 100  # a tmpfs that holds two blobs, under a 1 GiB budget
    write = os.write

    def small_tmpfs(fd: int, data: memoryview) -> int:
        used = sum(p.stat().st_size for p in folder.iterdir())
        mine = os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        if mine and used + len(data) > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    blobs = shared(client, folder)
    monkeypatch.setattr(os, "write", small_tmpfs)
    assert read(blobs, x) == x.digest and read(blobs, y) == y.digest
    assert read(blobs, z) == z.digest  # full: x, the least recently used, makes way
    monkeypatch.undo()
    assert [blob_file(folder, e).exists() for e in (x, y, z)] == [False, True, True]
    assert (blobs.cache.stats["evicted"], blobs.cache.stats["unwritable"]) == (1, 0)
    assert [p.name for p in folder.iterdir() if ".tmp." in p.name] == []


def test_a_starting_cache_sweeps_what_dead_fills_left_and_spares_live_ones(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    live = HostCache(folder, 1 << 20)
    for leftover in ("b-dead.tmp.1-2", "b-dead.lock", "b-gone.lock", "b-kept", "b-kept.lock"):
        (folder / leftover).write_bytes(b"")
    with live.filling("b-busy") as slot:
        assert slot.held
        (folder / "b-busy.tmp.3-4").write_bytes(b"half")
        HostCache(folder, 1 << 20)  # another agent starts meanwhile
        assert sorted(p.name for p in folder.iterdir()) == [
            "b-busy.lock",
            "b-busy.tmp.3-4",
            "b-kept",
            "b-kept.lock",
        ]


def test_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(ConfigError) as e:
        HostCache(folder, 1 << 20)
    assert str(e.value) == (
        f"HOTSWAP_HOST_CACHE_DIR={str(folder)!r} is writable by others (mode 777): "
        f"run `chmod 700 {folder}`"
    )
    assert list(folder.iterdir()) == []
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        share(
            BlobStore(redis.Redis(), MODEL),
            HotswapSettings(host_cache_dir=str(not_a_folder), _env_file=None),
        )  # type: ignore[call-arg]
    assert str(e.value).startswith(
        f"HOTSWAP_HOST_CACHE_DIR={str(not_a_folder)!r}: cannot create it ("
    )
    assert not_a_folder.read_bytes() == b"x"


def test_sharing_is_off_unless_a_folder_is_set() -> None:
    blobs = BlobStore(redis.Redis(), MODEL)
    assert share(blobs, HotswapSettings(_env_file=None)) is blobs  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _flushed(client: redis.Redis) -> None:
    """The `client` fixture empties Redis before each test."""


def test_the_next_filler_deletes_the_temporary_file_the_lock_names(tmp_path: Path) -> None:
    # What a filler killed mid-write leaves, planted after this cache's start-up
    # sweep: its lock file names its temporary file. A fill finds it there, without
    # listing the folder (another blob's dead fill is left for the next sweep).
    folder = tmp_path / "cache"
    cache = HostCache(folder, 1 << 20)
    (folder / "b-x.lock").write_bytes(b"b-x.tmp.999-1")
    (folder / "b-x.tmp.999-1").write_bytes(b"half")
    (folder / "b-y.tmp.5-6").write_bytes(b"half")
    (folder / "b-z.lock").write_bytes(b"b-y.tmp.5-6")  # names another blob's: not deleted
    with cache.filling("b-z") as slot:
        assert slot.held and slot.publish([b"zz"])
    with cache.filling("b-x") as slot:
        assert slot.held
        assert not (folder / "b-x.tmp.999-1").exists()
        assert slot.publish([b"xyz"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "b-x",
        "b-x.lock",
        "b-y.tmp.5-6",
        "b-z",
        "b-z.lock",
    ]
    # The lock names a temporary file only while it is written.
    assert (folder / "b-x.lock").read_bytes() == b""
    out = bytearray(3)
    assert cache.load_into("b-x", memoryview(out)) and out == b"xyz"
