"""The raw-socket blob transport, checked byte for byte against redis-py."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from polling import until
from redis.cache import CacheConfig
from redis.cluster import RedisCluster

from hotswap import codec, keys
from hotswap.embedded import EmbeddedRedis, free_port
from hotswap.manifest import TensorEntry
from hotswap.store import Store
from hotswap.transport import (
    REDIRECTED,
    BlobTransport,
    ChunkIO,
    NotApplicable,
    _Reader,
    _reply_error,
    get_command,
    set_header,
)

MiB = 1024 * 1024


def _blob(n: int, seed: int = 0) -> bytes:
    # Random, not a repeating pattern: an off-by-one chunk boundary would show.
    return random.Random(seed).randbytes(n)


def _transport(client: redis.Redis, window: int = 4) -> BlobTransport:
    t = BlobTransport.for_client(client, window=window)
    assert t is not None
    return t


def _views(sizes: list[int]) -> tuple[bytearray, list[memoryview]]:
    buf = bytearray(sum(sizes))
    view = memoryview(buf)
    out, at = [], 0
    for n in sizes:
        out.append(view[at : at + n])
        at += n
    return buf, out


def test_wire_encoding() -> None:
    assert get_command("a:b") == b"*2\r\n$3\r\nGET\r\n$3\r\na:b\r\n"
    assert set_header(b"k", 10) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n"


@pytest.mark.parametrize("window", [1, 3, 8])
def test_set_then_redis_py_reads_the_same_bytes(client: redis.Redis, window: int) -> None:
    values = [_blob(n, i) for i, n in enumerate([0, 1, 7, 65536, 3 * MiB + 5, 100, 2 * MiB])]
    keys = [f"b:{i}" for i in range(len(values))]
    _transport(client, window).set_chunks(keys, [memoryview(v) for v in values])
    assert [client.get(k) for k in keys] == values


@pytest.mark.parametrize("window", [1, 2, 4, 16])
def test_get_into_matches_redis_py(client: redis.Redis, window: int) -> None:
    values = [_blob(n, i) for i, n in enumerate([5, 0, 1 * MiB, 3 * MiB + 1, 17, 70000] * 3)]
    keys = [f"g:{i}" for i in range(len(values))]
    for k, v in zip(keys, values, strict=True):
        client.set(k, v)
    buf, outs = _views([len(v) for v in values])
    seen: list[tuple[int, int]] = []
    lengths = _transport(client, window).get_into(
        keys, outs, on_chunk=lambda i, n: seen.append((i, n))
    )
    assert lengths == [len(v) for v in values]
    assert bytes(buf) == b"".join(client.get(k) or b"" for k in keys)
    assert seen == [(i, len(v)) for i, v in enumerate(values)]


def test_missing_short_and_long_values_keep_the_stream_in_step(client: redis.Redis) -> None:
    client.set("ok1", b"a" * 1000)
    client.set("short", b"s" * 600)  # truncated: shorter than its buffer
    client.set("long", _blob(3 * MiB))  # longer than its buffer and than the scratch window
    client.set("ok2", b"z" * 2000)
    _buf, outs = _views([1000, 1000, 1000, 2 * MiB, 2000])
    t = _transport(client, window=2)
    lengths = t.get_into(["ok1", "absent", "short", "long", "ok2"], outs)
    assert lengths == [1000, None, 600, 3 * MiB, 2000]
    assert bytes(outs[0]) == b"a" * 1000
    assert bytes(outs[1]) == bytes(1000)  # untouched
    assert bytes(outs[2][:600]) == b"s" * 600 and bytes(outs[2][600:]) == bytes(400)
    assert bytes(outs[3]) == (client.get("long") or b"")[: 2 * MiB]
    assert bytes(outs[4]) == b"z" * 2000
    # The borrowed connection went back to the pool clean and works.
    assert client.ping() is True
    assert t.get_into(["ok1"], [memoryview(bytearray(1000))]) == [1000]


def test_error_reply_is_raised_as_redis_py_would_and_connection_stays_usable(
    client: redis.Redis,
) -> None:
    client.rpush("alist", b"x")
    client.set("fine", b"12345")
    t = _transport(client)
    _buf, outs = _views([5, 5, 5])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        t.get_into(["fine", "alist", "fine"], outs)
    assert bytes(outs[0]) == b"12345" and bytes(outs[2]) == b"12345"
    assert t.get_into(["fine"], [memoryview(bytearray(5))]) == [5]
    assert client.get("fine") == b"12345"


def test_length_mismatch_is_refused(client: redis.Redis) -> None:
    t = _transport(client)
    with pytest.raises(ValueError, match="2 keys for 1 values"):
        t.set_chunks(["a", "b"], [memoryview(b"x")])
    with pytest.raises(ValueError, match="1 keys for 0 buffers"):
        t.get_into(["a"], [])
    with pytest.raises(ValueError, match="window must be at least 1"):
        BlobTransport(client.connection_pool, window=0)
    assert client.exists("a", "b") == 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_both_resp_versions(server: EmbeddedRedis, protocol: int) -> None:
    client = redis.Redis.from_url(server.url, protocol=protocol)
    client.flushall()
    client.rpush("alist", b"x")
    t = _transport(client, window=2)
    data = _blob(MiB + 1)
    t.set_chunks(["p:0", "p:1"], [memoryview(data), memoryview(data)[:3]])
    buf, outs = _views([MiB + 1, 3, 4])
    assert t.get_into(["p:0", "p:1", "nope"], outs) == [MiB + 1, 3, None]
    assert bytes(buf) == data + data[:3] + bytes(4)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        t.get_into(["alist"], [memoryview(bytearray(1))])
    client.close()


def test_not_offered_where_only_redis_py_applies(server: EmbeddedRedis) -> None:
    cached = redis.Redis.from_url(server.url, protocol=3, cache_config=CacheConfig())
    assert BlobTransport.for_client(cached) is None
    assert BlobTransport.for_client(object()) is None
    cached.close()


def test_push_messages_attributes_and_bulk_errors_are_understood() -> None:
    # Out-of-band RESP3 data a server may interleave, fed through a socket pair.
    a, b = socket.socketpair()
    try:
        a.sendall(
            b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n:5\r\n"
            b"|1\r\n+ttl\r\n%1\r\n+a\r\n~2\r\n,1.5\r\n#t\r\n"
            b"$4\r\nabcd\r\n"
            b"!21\r\nSYNTAX invalid syntax\r\n"
            b"_\r\n"
        )
        reader = _Reader(b)
        line = reader.reply()
        assert line == b"$4"
        out = bytearray(4)
        reader.into(memoryview(out), 4)
        reader.skip(2)
        assert bytes(out) == b"abcd"
        error = _reply_error(reader, reader.reply())
        assert isinstance(error, redis.ResponseError)
        assert str(error) == "SYNTAX invalid syntax"
        assert reader.reply() == b"_"
    finally:
        a.close()
        b.close()


@pytest.fixture
def acl_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as srv:
        admin = redis.Redis.from_url(srv.url)
        admin.acl_setuser(
            "blobs", enabled=True, passwords=["+s3cret"], keys=["b:*"], commands=["+@all"]
        )
        admin.acl_setuser("default", enabled=True, nopass=False, passwords=["+adminpw"])
        admin.close()
        yield srv


def test_acl_user_password_and_db(acl_server: EmbeddedRedis) -> None:
    url = f"redis://blobs:s3cret@127.0.0.1:{acl_server.port}/3"
    client = redis.Redis.from_url(url)
    t = _transport(client)
    data = _blob(2 * MiB + 3)
    t.set_chunks(["b:1"], [memoryview(data)])
    assert client.get("b:1") == data
    db0 = redis.Redis.from_url(f"redis://blobs:s3cret@127.0.0.1:{acl_server.port}/0")
    assert db0.get("b:1") is None  # SELECT 3 happened on the borrowed socket
    out = bytearray(len(data))
    assert t.get_into(["b:1"], [memoryview(out)]) == [len(data)]
    assert bytes(out) == data
    # A key outside the user's pattern: the NOPERM reply maps to redis-py's class.
    with pytest.raises(redis.exceptions.NoPermissionError):
        t.set_chunks(["other:1"], [memoryview(b"x")])
    assert client.exists("b:1") == 1
    client.close()
    db0.close()


def test_wrong_password_is_redis_py_authentication_error(acl_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(f"redis://blobs:wrong@127.0.0.1:{acl_server.port}/0")
    t = _transport(client)
    with pytest.raises(redis.AuthenticationError):
        t.set_chunks(["b:1"], [memoryview(b"x")])
    admin = redis.Redis.from_url(f"redis://default:adminpw@127.0.0.1:{acl_server.port}/0")
    assert admin.exists("b:1") == 0
    admin.close()


def test_unix_socket() -> None:
    sock_dir = tempfile.mkdtemp(prefix="hs-unix-")
    path = os.path.join(sock_dir, "redis.sock")
    try:
        with EmbeddedRedis(extra_args=["--unixsocket", path, "--unixsocketperm", "700"]):
            client = redis.Redis.from_url(f"unix://{path}?db=2")
            t = _transport(client)
            data = _blob(5 * MiB)
            t.set_chunks(["u:0", "u:1"], [memoryview(data), memoryview(data)[:10]])
            assert client.get("u:0") == data and client.get("u:1") == data[:10]
            out = bytearray(len(data))
            assert t.get_into(["u:0"], [memoryview(out)]) == [len(data)]
            assert bytes(out) == data
            client.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _make_cert(directory: Path) -> tuple[str, str]:
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
            "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path)
    tls_port = free_port()
    args = ["--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key]
    args += ["--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
    with EmbeddedRedis(extra_args=args) as srv:
        client = redis.Redis.from_url(
            f"rediss://127.0.0.1:{tls_port}/1", ssl_ca_certs=cert, ssl_check_hostname=True
        )
        t = _transport(client, window=3)
        values = [_blob(n, i) for i, n in enumerate([3 * MiB, 1, 0, 200_000])]
        keys = [f"t:{i}" for i in range(len(values))]
        t.set_chunks(keys, [memoryview(v) for v in values])
        plain = redis.Redis.from_url(srv.url.replace("/0", "/1"))
        assert [plain.get(k) for k in keys] == values
        buf, outs = _views([len(v) for v in values])
        assert t.get_into(keys, outs) == [len(v) for v in values]
        assert bytes(buf) == b"".join(values)
        client.close()
        plain.close()


def test_dead_server_is_a_connection_error_and_the_socket_is_dropped() -> None:
    with EmbeddedRedis() as srv:
        client = redis.Redis.from_url(srv.url, socket_timeout=2)
        t = _transport(client)
        client.set("k", b"v" * 10)
        srv.kill()
        with pytest.raises(redis.ConnectionError):
            t.get_into(["k"], [memoryview(bytearray(10))])
        srv.start()
        client.set("k", b"w" * 10)
        out = bytearray(10)
        assert t.get_into(["k"], [memoryview(out)]) == [10]
        assert bytes(out) == b"w" * 10
        client.close()


def test_frozen_server_is_a_timeout_error(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=0.3)
    client.flushall()
    client.set("k", b"v" * 10)
    t = _transport(client)
    server.freeze()
    try:
        with pytest.raises(redis.TimeoutError):
            t.get_into(["k"], [memoryview(bytearray(10))])
    finally:
        server.thaw()
    out = bytearray(10)
    assert t.get_into(["k"], [memoryview(out)]) == [10]
    assert bytes(out) == b"v" * 10
    client.close()


# -- ChunkIO: which path, on which node -----------------------------------------------


def _entry(name: str, data: bytes, chunk: int) -> TensorEntry:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    s = codec.stats(t)
    return TensorEntry(name, "U8", (len(data),), len(data), codec.digest(data), chunk, s.norm,
                       s.max_abs)  # fmt: skip


class _Node:
    def __init__(self, name: str, client: object) -> None:
        self.name, self.redis_connection = name, client


class _ClusterWithoutConnections:
    """Quacks like RedisCluster where ChunkIO asks it: every key on one unreachable node."""

    def get_node_from_key(self, key: str | bytes) -> _Node:
        return _Node("127.0.0.1:1", None)


def test_a_node_without_a_plain_connection_is_not_applicable() -> None:
    io = ChunkIO(_ClusterWithoutConnections())
    with pytest.raises(NotApplicable, match=r"cluster node 127\.0\.0\.1:1 has no plain connection"):
        io.get_into(["k"], [memoryview(bytearray(1))])
    with pytest.raises(NotApplicable):
        io.set_chunks(["k"], [memoryview(b"v")])
    assert NotApplicable in REDIRECTED  # the blob store then takes redis-py's path


def _cluster(servers: list[EmbeddedRedis], second_bus_port: int) -> None:
    a, b = (redis.Redis(port=s.port) for s in servers)
    a.execute_command("CLUSTER ADDSLOTSRANGE", 0, 8191)
    b.execute_command("CLUSTER ADDSLOTSRANGE", 8192, 16383)
    a.execute_command("CLUSTER MEET", "127.0.0.1", servers[1].port, second_bus_port)

    def formed() -> bool:
        return all(
            c.cluster("info")["cluster_state"] == "ok" and len(c.cluster("nodes")) == 2
            for c in (a, b)
        )

    assert until(formed, attempts=400, pause=0.05), "cluster did not form"
    a.close()
    b.close()


@pytest.mark.slow
def test_cluster_goes_through_the_node_that_owns_each_key() -> None:
    # Bus ports given: the default, port + 10000, overflows for the high
    # ephemeral ports free_port() hands out.
    bus = [free_port(), free_port()]
    args = [["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(b)] for b in bus]  # fmt: skip
    with EmbeddedRedis(extra_args=args[0]) as one, EmbeddedRedis(extra_args=args[1]) as two:
        _cluster([one, two], bus[1])
        client = RedisCluster(host="127.0.0.1", port=one.port)
        blobs = Store(client, "m").blobs
        data = _blob(40 * 1024 + 5, 4)
        entry = _entry("w", data, 1024)
        blobs.upload(entry, memoryview(data))
        fast = blobs._blob_io
        assert fast is not None and len(fast._nodes) == 2  # keys spread over both shards
        out = bytearray(len(data))
        landed: list[int] = []
        hashing = codec.ChunkDigest(memoryview(out), 1024)

        def seen(i: int, n: int) -> None:
            landed.append(i)
            hashing.landed(i, n)

        blobs.read_into(entry, memoryview(out), 1, seen)
        assert bytes(out) == data
        # Node by node: every chunk once, not in order overall, hashed all the same.
        assert sorted(landed) == list(range(entry.chunks)) and landed != sorted(landed)
        assert hashing.hexdigest() == entry.digest
        for i in range(entry.chunks):
            key = keys.blob_key("hotswap", "m", entry.digest, 1024, i)
            assert client.get(key) == data[i * 1024 : (i + 1) * 1024]

        # Move the slot of chunk 0 to the other node behind the client's back: the
        # fast path gets MOVED, and redis-py's path follows it.
        key0 = keys.blob_key("hotswap", "m", entry.digest, 1024, 0)
        slot = client.keyslot(key0)
        owner = client.get_node_from_key(key0)
        other = next(n for n in client.get_nodes() if n.name != owner.name)
        direct = {n.name: redis.Redis(host=n.host, port=n.port) for n in client.get_nodes()}
        value = direct[owner.name].get(key0)
        direct[owner.name].delete(key0)
        target_id = direct[other.name].cluster("myid")
        for node in direct.values():
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        direct[other.name].set(key0, value)
        with pytest.raises(redis.exceptions.MovedError):
            fast.get_into([key0], [memoryview(bytearray(1024))])
        out = bytearray(len(data))
        blobs.read_into(entry, memoryview(out), 1)
        assert bytes(out) == data
        blobs.upload(entry, memoryview(data))  # writes follow the move too
        assert direct[other.name].get(key0) == data[:1024]
        for node in direct.values():
            node.close()
        client.close()
