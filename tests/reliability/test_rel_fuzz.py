"""Hostile bytes: random, mutated and structurally wrong input to every decoder.

What is proven for manifests, notices, agent status records, tensor chunks and
checkpoint files: the only exceptions that escape are HotswapError subclasses
(the exact subclass each decoder promises), their messages are one line,
nothing hangs, and a size declared in a header is refused before it is
allocated. Cases are derandomized so CI runs the same inputs every time;
``CASES`` counts them and the session prints the totals.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import redis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from hotswap import codec, notice, status
from hotswap import manifest as mf
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import FormatError, HotswapError, IntegrityError, SourceError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.store import Store
from publisher.sources import open_source

pytestmark = pytest.mark.reliability

CASES: collections.Counter[str] = collections.Counter()
SLOWEST: dict[str, float] = {}
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEY = b"fuzz-signing-key"


def fuzz(cases: int) -> settings:
    """Hypothesis settings of one fuzz test: ``cases`` derandomized examples."""
    return settings(BASE, max_examples=cases)


MiB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    rows = ", ".join(f"{k} {n}" for k, n in sorted(CASES.items()))
    slow = max(SLOWEST.values(), default=0.0)
    print(f"\nfuzz cases: {total} ({rows}); slowest single case {slow * 1000:.1f} ms")


def refused(kind: str, fn: Callable[[], Any], allowed: type[HotswapError]) -> Any:
    """Run one case: return the value, or check the error is ``allowed`` and one line.

    Any other exception propagates and fails the test.
    """
    CASES[kind] += 1
    started = time.perf_counter()
    try:
        return fn()
    except HotswapError as e:
        assert isinstance(e, allowed), f"{kind}: {type(e).__name__} is not {allowed.__name__}: {e}"
        text = str(e)
        assert text and "\n" not in text, f"{kind}: message is not one line: {text[:300]!r}"
        return None
    finally:
        took = time.perf_counter() - started
        SLOWEST[kind] = max(SLOWEST.get(kind, 0.0), took)
        assert took < 5.0, f"{kind}: one case took {took:.1f} s"


# -- valid seeds and mutations -------------------------------------------------------

LINEAGE = "0" * 32


def entry(name: str, dtype: str, shape: tuple[int, ...], fill: int) -> TensorEntry:
    nbytes = math.prod(shape) * codec.itemsize(dtype)
    digest = hashlib.sha256(bytes([fill])).hexdigest()
    return TensorEntry(name, dtype, shape, nbytes, digest, 64 * 1024, 1.5, 0.5)


SEED_MANIFEST = Manifest(
    model="m",
    version=7,
    parent=6,
    lineage=LINEAGE,
    tensors=(
        entry("a.weight", "F32", (4, 4), 1),
        entry("b.bias", "BF16", (8,), 2),
        entry("c.idx", "I64", (2, 3, 1), 3),
    ),
    created=1.0,
    author="fuzz@host",
    message="seed",
)
SEEDS = {
    "unsigned": mf.encode(SEED_MANIFEST),
    "signed": mf.encode(SEED_MANIFEST, KEY),
}
NOTICE_SEED = notice.encode(notice.Notice("m", 7, "publish", LINEAGE))
STATUS_SEED = status.encode(
    status.AgentStatus(
        agent_id="host-1-abc",
        host="host",
        pid=1,
        state="idle",
        version=7,
        lineage=LINEAGE,
        rejection={"a.weight": ["norm ratio 20 over 10"]},
    )
)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte-level edits: flips, overwrites, inserts, cuts, repeats."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xC0, 0xC1, 0xC4, 0xC6, 0xDC, 0xDD, 0xDF, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


# Any value msgpack can carry, as an attacker would write it.
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=8,
)


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def body_of(m: Manifest) -> dict[str, Any]:
    return dict(msgpack.unpackb(msgpack.unpackb(mf.encode(m))["body"]))


def envelope(body: bytes, key: bytes | None = None, kid: Any = None, sig: Any = None) -> bytes:
    if key is not None:
        kid, sig = mf.key_id(key), hmac.new(key, body, hashlib.sha256).digest()
    return pack({"format": mf.FORMAT, "body": body, "kid": kid, "sig": sig})


# -- manifests -----------------------------------------------------------------------


def decode_manifest(data: bytes, keys: list[bytes]) -> Manifest | None:
    m = refused("manifest", lambda: mf.decode(data, keys=keys), IntegrityError)
    if m is not None:
        # Whatever decodes must re-encode to bytes that decode the same way.
        again = mf.decode(mf.encode(m, keys[0] if keys else None), keys=keys)
        assert again.tensors == m.tensors or any(math.isnan(t.norm) for t in m.tensors)
    return m


@fuzz(800)
@given(data=st.binary(max_size=600), signed=st.booleans())
def test_random_bytes_as_manifest(data: bytes, signed: bool) -> None:
    decode_manifest(data, [KEY] if signed else [])


@fuzz(1200)
@given(which=st.sampled_from(sorted(SEEDS)), data=st.data(), check_sig=st.booleans())
def test_mutated_manifest_bytes(which: str, data: st.DataObject, check_sig: bool) -> None:
    raw = data.draw(mutated(SEEDS[which]))
    m = decode_manifest(raw, [KEY] if check_sig else [])
    if m is not None and check_sig:
        # A mutation that still verifies cannot have touched the signed body.
        assert m == SEED_MANIFEST


@fuzz(600)
@given(data=st.data(), signed=st.booleans())
def test_manifest_bodies_with_wrong_fields(data: st.DataObject, signed: bool) -> None:
    """Valid msgpack, valid signature, hostile contents: every field and tensor field."""
    body = body_of(SEED_MANIFEST)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["field", "entry", "drop", "add", "tensors"]))
        if where == "field":
            body[data.draw(st.sampled_from(sorted(body)))] = data.draw(VALUES)
        elif where == "entry" and isinstance(body.get("tensors"), list) and body["tensors"]:
            tensors = list(body["tensors"])
            i = data.draw(st.integers(0, len(tensors) - 1))
            row = list(tensors[i]) if isinstance(tensors[i], list) else [tensors[i]]
            if row:
                row[data.draw(st.integers(0, len(row) - 1))] = data.draw(VALUES)
            tensors[i] = row
            body["tensors"] = tensors
        elif where == "drop" and body:
            body.pop(data.draw(st.sampled_from(sorted(body))))
        elif where == "add":
            body[data.draw(st.text(max_size=10))] = data.draw(VALUES)
        elif where == "tensors":
            body["tensors"] = data.draw(st.lists(VALUES, max_size=4))
    raw = pack(body)
    decode_manifest(envelope(raw, KEY if signed else None), [KEY] if signed else [])


@fuzz(400)
@given(env=VALUES)
def test_arbitrary_msgpack_as_manifest(env: Any) -> None:
    decode_manifest(pack(env), [])


# -- notices and status records ------------------------------------------------------


@fuzz(500)
@given(data=st.binary(max_size=300) | mutated(NOTICE_SEED))
def test_hostile_notice_bytes(data: bytes) -> None:
    refused("notice", lambda: notice.decode(data), FormatError)


@fuzz(300)
@given(
    value=VALUES
    | st.fixed_dictionaries(
        {}, optional=dict.fromkeys(["model", "version", "kind", "lineage"], VALUES)
    )
)
def test_arbitrary_msgpack_as_notice(value: Any) -> None:
    n = refused("notice", lambda: notice.decode(pack(value)), FormatError)
    if n is not None:
        assert isinstance(n.version, int) and isinstance(n.model, str)


@fuzz(500)
@given(data=st.binary(max_size=300) | mutated(STATUS_SEED))
def test_hostile_status_bytes(data: bytes) -> None:
    refused("status", lambda: status.decode(data), FormatError)


STATUS_FIELDS = sorted(status.AgentStatus.__dataclass_fields__)


@fuzz(500)
@given(
    value=st.dictionaries(
        st.sampled_from(STATUS_FIELDS) | st.text(max_size=8),
        LEAVES
        | st.lists(LEAVES, max_size=3)
        | st.dictionaries(st.text(max_size=8), st.lists(LEAVES, max_size=2) | LEAVES, max_size=3),
        max_size=12,
    )
)
def test_status_records_with_wrong_fields(value: dict[str, Any]) -> None:
    record = refused("status", lambda: status.decode(pack(value)), FormatError)
    if record is not None:
        # What decodes is safe to format, as `hotswap status` does.
        assert isinstance(record.agent_id, str) and isinstance(record.pid, int)
        assert all(isinstance(r, str) for rs in record.rejection.values() for r in rs)


# -- chunks --------------------------------------------------------------------------

DTYPE_NAMES = sorted(codec.DTYPES)


@fuzz(600)
@given(
    buf=st.binary(max_size=256),
    dtype=st.sampled_from(DTYPE_NAMES) | st.text(max_size=6),
    shape=st.lists(st.integers(0, 64) | st.integers(0, 2**62), max_size=5).map(tuple),
)
def test_chunk_bytes_to_tensor(buf: bytes, dtype: str, shape: tuple[int, ...]) -> None:
    t = refused("chunk", lambda: codec.from_bytes(buf, dtype, shape), FormatError)
    if t is not None:
        assert tuple(t.shape) == shape and bytes(codec.as_bytes(t)) == buf


def test_impossible_shapes_are_format_errors() -> None:
    """Found by the fuzzer: torch's RuntimeError used to escape from_bytes for these."""
    with pytest.raises(FormatError, match=r"shape \[-2, -2\] of a F32 tensor has a negative"):
        codec.from_bytes(b"\0" * 16, "F32", (-2, -2))
    with pytest.raises(FormatError, match="cannot exist: numel: integer multiplication overflow"):
        codec.from_bytes(b"", "BF16", (7, 51, 51, 1013167686807797, 0))


CHUNK = 4096
ORIGINAL = bytes(range(256)) * 40  # 10,240 bytes: chunks of 4096, 4096, 2048
CHUNK_ENTRY = TensorEntry(
    "w", "U8", (len(ORIGINAL),), len(ORIGINAL), codec.digest(ORIGINAL), CHUNK, 1.0, 1.0
)


@pytest.fixture(scope="module")
def chunk_store(redis_server: EmbeddedRedis) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    store = Store(client, "fuzz-chunks", retrying=operation_retry(2, 0.1))
    yield store
    store.delete_all()
    client.close()


@fuzz(200)
@given(
    chunks=st.tuples(
        *(
            st.none()
            | st.just(ORIGINAL[i * CHUNK : (i + 1) * CHUNK])
            | st.binary(min_size=0, max_size=CHUNK + 8)
            | mutated(ORIGINAL[i * CHUNK : (i + 1) * CHUNK])
            for i in range(CHUNK_ENTRY.chunks)
        )
    )
)
def test_hostile_chunks_in_redis(chunk_store: Store, chunks: tuple[bytes | None, ...]) -> None:
    """Missing, short, long and garbled chunks: IntegrityError, or exactly the stored bytes
    (which then pass the digest check only if they are the original)."""
    client, names = chunk_store.client, chunk_store.blobs._chunk_keys(CHUNK_ENTRY)
    client.delete(*names)
    for name, value in zip(names, chunks, strict=True):
        if value is not None:
            client.set(name, value)
    out = bytearray(CHUNK_ENTRY.nbytes)

    def read() -> bytes:
        chunk_store.blobs.read_into(CHUNK_ENTRY, memoryview(out), 1)
        codec.check_digest("w", out, CHUNK_ENTRY.digest, "model 'fuzz-chunks' v1")
        return bytes(out)

    got = refused("chunk in redis", read, IntegrityError)
    intact = all(c == ORIGINAL[i * CHUNK : (i + 1) * CHUNK] for i, c in enumerate(chunks))
    assert (got is not None) == intact
    if got is not None:
        assert got == ORIGINAL


# -- size bombs ------------------------------------------------------------------------


def peak_python_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    except HotswapError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


GIANT_HEADERS = {
    "bin32 of 4 GiB": b"\xc6\xff\xff\xff\xff" + b"x" * 16,
    "str32 of 4 GiB": b"\xdb\xff\xff\xff\xff" + b"x" * 16,
    "array32 of 4G elements": b"\xdd\xff\xff\xff\xff" + b"\x00" * 16,
    "array32 of 10^9 elements": b"\xdd" + struct.pack(">I", 10**9) + b"\x00" * 16,
    "map32 of 4G pairs": b"\xdf\xff\xff\xff\xff" + b"\xa1a\x00" * 8,
    "ext32 of 4 GiB": b"\xc9\xff\xff\xff\xff\x01" + b"x" * 16,
}


def manifest_with_body(body_bytes: bytes) -> bytes:
    return envelope(body_bytes)


@pytest.mark.parametrize("name", sorted(GIANT_HEADERS))
def test_giant_declared_sizes_fail_fast_without_allocating(name: str) -> None:
    header = GIANT_HEADERS[name]
    body = b"\x81\xa7tensors" + header  # {"tensors": <giant>}
    cases = {
        "manifest": lambda: mf.decode(header),
        "manifest body": lambda: mf.decode(manifest_with_body(body)),
        "notice": lambda: notice.decode(header),
        "status": lambda: status.decode(header),
    }
    for what, fn in cases.items():
        started = time.perf_counter()
        peak = peak_python_bytes(fn)
        took = time.perf_counter() - started
        CASES["bomb"] += 1
        assert peak < 1 * MiB, f"{what} with {name}: peak {peak} bytes"
        assert took < 1.0, f"{what} with {name}: {took:.2f} s"
        with pytest.raises(FormatError):
            fn()


def test_declared_tensor_sizes_over_the_limits_are_refused() -> None:
    limits = mf.Limits(max_manifest_bytes=1 * MiB, max_tensors=4, max_tensor_bytes=1 * MiB)
    huge = body_of(SEED_MANIFEST)
    huge["tensors"] = [["w", "F32", [2**20, 2**20], 2**42, "0" * 64, 65536, 1.0, 1.0]]
    with pytest.raises(
        FormatError, match=r"tensor 'w': declares 4398046511104 bytes, limit 1048576"
    ):
        mf.decode(envelope(pack(huge)), limits=limits)
    many = body_of(SEED_MANIFEST)
    many["tensors"] = [[f"t{i}", "U8", [1], 1, "0" * 64, 65536, 1.0, 1.0] for i in range(5)]
    with pytest.raises(FormatError, match="declares more than 4 tensors"):
        mf.decode(envelope(pack(many)), limits=limits)
    with pytest.raises(FormatError, match="over the 1048576 limit"):
        mf.decode(b"\x00" * (MiB + 1), limits=limits)
    # A billion-element shape whose product does not match nbytes: refused, no allocation.
    lie = body_of(SEED_MANIFEST)
    lie["tensors"] = [["w", "F32", [10**9], 4, "0" * 64, 65536, 1.0, 1.0]]
    assert peak_python_bytes(lambda: mf.decode(envelope(pack(lie)))) < MiB
    with pytest.raises(FormatError, match="4 bytes do not match F32 shape"):
        mf.decode(envelope(pack(lie)))
    CASES["bomb"] += 4


def test_chunk_declaring_a_huge_tensor_is_refused_before_allocating() -> None:
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with pytest.raises(
        FormatError, match=r"16 bytes cannot hold a F64 tensor of shape \[1000000000000\]"
    ):
        codec.from_bytes(b"\0" * 16, "F64", (10**12,))
    with pytest.raises(FormatError, match="cannot hold a U8 tensor"):
        codec.from_bytes(b"\0" * 16, "U8", (2**31, 2**31, 2**31))
    assert time.perf_counter() - started < 1.0
    assert psutil.Process().memory_info().rss - rss < 64 * MiB
    CASES["bomb"] += 2


NESTING = 1000  # msgpack's C unpacker stops at 1024 levels


def nested_arrays(levels: int, declared: int = 100_000) -> bytes:
    return (b"\xdd" + struct.pack(">I", declared)) * levels


def test_nested_array_headers_are_bounded() -> None:
    """5 KB of nested array headers, each within the limits: the transient
    allocation is bounded (msgpack caps its preallocation per level), not a bomb
    that grows with the declared sizes."""
    data = nested_arrays(NESTING)
    for what, fn in {
        "manifest": lambda: mf.decode(data),
        "manifest body": lambda: mf.decode(manifest_with_body(b"\x81\xa7tensors" + data)),
        "status": lambda: status.decode(nested_arrays(NESTING, 5000)),
    }.items():
        peak = peak_python_bytes(fn)
        CASES["bomb"] += 1
        assert peak < 128 * MiB, f"{what}: {peak / MiB:.0f} MiB from {len(data)} bytes"


def test_nested_array_headers_allocate_little() -> None:
    """msgpack allocates the slots an array header declares before reading them:
    the decoders' array limits keep nested headers from costing ~80 KB a level."""
    data = nested_arrays(NESTING)
    assert peak_python_bytes(lambda: mf.decode(data)) < 8 * MiB
    body = manifest_with_body(b"\x81\xa7tensors" + data)
    assert peak_python_bytes(lambda: mf.decode(body)) < 8 * MiB
    assert peak_python_bytes(lambda: status.decode(nested_arrays(NESTING, 5000))) < 8 * MiB
    assert peak_python_bytes(lambda: notice.decode(nested_arrays(NESTING // 2, 5000))) < 8 * MiB
    # Arrays inside a tensor entry, each within the entry limit, 1000 deep.
    entry = b"\x91" + b"\xdc\x00\x80" * NESTING
    assert peak_python_bytes(lambda: mf.decode(manifest_with_body(b"\x81\xa7tensors" + entry))) < (
        8 * MiB
    )


# -- checkpoint files ----------------------------------------------------------------


def load_everything(path: Path) -> int:
    """Open a checkpoint as a publish would and read every tensor; the byte count."""
    total = 0
    with open_source(path) as src:
        for name in src.names:
            src.size(name)
            total += len(codec.as_bytes(src.load(name)))
    return total


SAFETENSORS_SEED = st_save(
    {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
)


def pt_seed() -> bytes:
    import io

    out = io.BytesIO()
    torch.save({"a": torch.arange(6, dtype=torch.float32), "b": torch.zeros(2, 2)}, out)
    return out.getvalue()


PT_SEED = pt_seed()


@st.composite
def safetensors_header_edits(draw: st.DrawFn) -> bytes:
    """A safetensors file whose JSON header was edited: dtypes, shapes, offsets, sizes."""
    (size,) = struct.unpack("<Q", SAFETENSORS_SEED[:8])
    header = json.loads(SAFETENSORS_SEED[8 : 8 + size])
    data = SAFETENSORS_SEED[8 + size :]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        if not isinstance(header[name], dict):
            header[name] = {}
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        if field == "dtype":
            header[name]["dtype"] = draw(
                st.sampled_from(["F32", "F64", "BF16", "U8", "X9", "", "I64"])
            )
        elif field == "shape":
            header[name]["shape"] = draw(
                st.lists(st.integers(-2, 4) | st.sampled_from([10**9, 2**40, 2**63]), max_size=4)
            )
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(
                st.lists(
                    st.integers(-1, 200) | st.sampled_from([2**40, 2**63]), min_size=0, max_size=3
                )
            )
        else:
            header[name] = draw(st.sampled_from([None, 1, "x", [], {}]))
    text = json.dumps(header).encode()
    declared = draw(st.sampled_from(["true", "true", "huge", "short", "long"]))
    n = {"true": len(text), "huge": 2**62, "short": max(0, len(text) - 3), "long": len(text) + 50}[
        declared
    ]
    return struct.pack("<Q", n) + text + data


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


@fuzz(300)
@given(data=safetensors_header_edits() | mutated(SAFETENSORS_SEED) | st.binary(max_size=200))
def test_hostile_safetensors_files(tmp_dir: Path, data: bytes) -> None:
    path = write(tmp_dir, "model.safetensors", data)
    refused("safetensors", lambda: load_everything(path), SourceError)


@fuzz(250)
@given(data=mutated(PT_SEED) | st.binary(max_size=200))
def test_hostile_pt_files(tmp_dir: Path, data: bytes) -> None:
    path = write(tmp_dir, "model.pt", data)
    refused("pt", lambda: load_everything(path), SourceError)


@fuzz(150)
@given(index=VALUES | st.fixed_dictionaries({"weight_map": VALUES}))
def test_hostile_shard_index(tmp_dir: Path, index: Any) -> None:
    folder = tmp_dir / "sharded"
    folder.mkdir(exist_ok=True)
    write(folder, "model-00001.safetensors", SAFETENSORS_SEED)
    try:
        text = json.dumps(index)
    except (TypeError, ValueError):
        text = repr(index)
    path = write(folder, "model.safetensors.index.json", text.encode())
    refused("index", lambda: load_everything(path), SourceError)


def test_safetensors_header_declaring_exabytes_is_refused_fast(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}})
    path = write(tmp_path, "bomb.safetensors", struct.pack("<Q", len(header)) + header.encode())
    big = write(tmp_path, "big-header.safetensors", struct.pack("<Q", 2**62) + b"{}")
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    for p in (path, big):
        with pytest.raises(SourceError, match="not a valid safetensors file"):
            load_everything(p)
    assert time.perf_counter() - started < 2.0
    assert psutil.Process().memory_info().rss - rss < 64 * MiB
    CASES["bomb"] += 2
