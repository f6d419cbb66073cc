"""Manifest: pinned wire bytes, strict decoding, HMAC signing with key rotation."""

from __future__ import annotations

import ast
import hashlib
import hmac
import math
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import codec
from hotswap.errors import ConfigError, FormatError, SignatureError, SourceError
from hotswap.manifest import (
    FORMAT,
    FORMAT_DELTA,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_LEN,
    MIN_CHUNK_BYTES,
    DeltaRef,
    EntryCache,
    Limits,
    Manifest,
    TensorEntry,
    decode,
    derive,
    encode,
    key_id,
    new_lineage,
)

MiB = 1024 * 1024
KEY_A = b"key-A"
KEY_B = b"key-B"
LINEAGE = "0123456789abcdef0123456789abcdef"


def fixed_manifest() -> Manifest:
    return Manifest(
        model="m",
        version=3,
        parent=2,
        lineage=LINEAGE,
        tensors=(
            TensorEntry("b", "F32", (2,), 8, "ab" * 32, 65536, 1.5, 1.0),
            TensorEntry("a", "BF16", (), 2, "cd" * 32, 4096, 0.5, 0.5),
        ),
        created=1700000000.25,
        author="alice@host",
        message="step 1",
    )


BODY_HEX = (
    "8aa56d6f64656ca16da776657273696f6e03a6706172656e7402a76c696e65616765d920303132333435"
    "3637383961626364656630313233343536373839616263646566a46b696e64a77075626c697368ab726f"
    "6c6c6261636b5f746fc0a763726561746564cb41d954fc40100000a6617574686f72aa616c6963654068"
    "6f7374a76d657373616765a6737465702031a774656e736f72739298a161a442463136900"
    "2d940" + "6364" * 32 + "cd1000cb3fe0000000000000cb3fe000000000000098a162a346333291"
    "0208d940" + "6162" * 32 + "ce00010000cb3ff8000000000000cb3ff0000000000000"
)
UNSIGNED_HEX = "84a6666f726d617401a4626f6479c5015d" + BODY_HEX + "a36b6964c0a3736967c0"
SIGNED_HEX = (
    "84a6666f726d617401a4626f6479c5015d"
    + BODY_HEX
    + "a36b6964b062666332376133363434643066316434a3736967c420"
    + "08fa552ff4a0192ca5b0ed0336b68249138552cd44c40226b9b1fe6d1ded131c"
)


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def envelope(body: Any, **over: Any) -> bytes:
    env = {"format": FORMAT, "body": body if isinstance(body, bytes) else pack(body)}
    env.update({"kid": None, "sig": None})
    env.update(over)
    return pack(env)


def body_of(m: Manifest) -> dict[str, Any]:
    return dict(unpack(unpack(encode(m))["body"]))


def format_error(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(FormatError) as e:
        decode(data, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def signature_error(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(SignatureError) as e:
        decode(data, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# -- the pinned encoding ---------------------------------------------------------


def test_golden_bytes_unsigned() -> None:
    m = fixed_manifest()
    assert encode(m).hex() == UNSIGNED_HEX
    assert decode(encode(m)) == m
    assert decode(encode(m)).key_id is None


def test_golden_bytes_signed() -> None:
    m = fixed_manifest()
    data = encode(m, KEY_A)
    assert data.hex() == SIGNED_HEX
    env = unpack(data)
    # The signature is an HMAC-SHA256 over exactly the body bytes.
    assert env["body"].hex() == BODY_HEX
    assert env["sig"] == hmac.new(KEY_A, bytes.fromhex(BODY_HEX), hashlib.sha256).digest()
    assert env["kid"] == hashlib.sha256(b"hotswap-key-id:key-A").hexdigest()[:16]
    decoded = decode(data, keys=[KEY_A])
    assert decoded == m
    assert decoded.key_id == key_id(KEY_A) == "bfc27a3644d0f1d4"


def test_encoding_is_canonical() -> None:
    m = fixed_manifest()
    swapped = derive(m, tensors=tuple(reversed(m.tensors)))
    assert [t.name for t in swapped.tensors] == ["a", "b"]
    assert encode(swapped) == encode(m)
    assert encode(decode(encode(m))) == encode(m)


def test_manifest_helpers() -> None:
    m = fixed_manifest()
    assert [t.name for t in m.tensors] == ["a", "b"]
    assert m.by_name()["b"].shape == (2,)
    assert m.nbytes == 10
    assert m.by_name()["b"].chunks == 1
    assert TensorEntry("x", "U8", (10,), 10, "ab" * 32, 3, 0.0, 0.0).chunks == 4
    a, b = m.by_name()["a"], m.by_name()["b"]
    assert a.same_content(derive(m).by_name()["a"]) and not a.same_content(b)
    assert derive(m, version=4, parent=3).version == 4
    lineages = {new_lineage() for _ in range(20)}
    assert len(lineages) == 20 and all(len(x) == 32 for x in lineages)


@st.composite
def entries(draw: st.DrawFn) -> TensorEntry:
    dtype = draw(st.sampled_from(sorted(codec.DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 100), max_size=4)))
    norm = draw(st.floats(allow_nan=True))
    return TensorEntry(
        draw(st.text(min_size=1, max_size=20)),
        dtype,
        shape,
        codec.itemsize(dtype) * math.prod(shape),
        draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
        draw(
            st.integers(
                min(MIN_CHUNK_BYTES, codec.itemsize(dtype) * math.prod(shape)) or 1, MAX_CHUNK_BYTES
            )
        ),
        norm,
        abs(norm),
    )


@settings(max_examples=100, deadline=None)
@given(
    tensors=st.lists(entries(), max_size=6, unique_by=lambda e: e.name),
    version=st.integers(1, 2**62),
    parent=st.none() | st.integers(0, 2**62),
    message=st.text(max_size=200),
    key=st.none() | st.binary(min_size=1, max_size=64),
)
def test_any_manifest_round_trips(
    tensors: list[TensorEntry], version: int, parent: int | None, message: str, key: bytes | None
) -> None:
    m = Manifest("m", version, parent, LINEAGE, tuple(tensors), message=message, created=1.5)
    data = encode(m, key)
    back = decode(data, keys=[key] if key else [])
    assert encode(back, key) == data
    assert [t.name for t in back.tensors] == sorted(t.name for t in tensors)
    # NaN stats make == fail on floats, so compare through the bytes above
    # and the fields that are never NaN here.
    assert (back.version, back.parent, back.message) == (version, parent, message)


# -- signatures ------------------------------------------------------------------


def test_key_rotation_accepts_any_listed_key() -> None:
    m = fixed_manifest()
    assert decode(encode(m, KEY_B), keys=[KEY_A, KEY_B]) == m
    assert decode(encode(m, KEY_A), keys=[KEY_A, KEY_B]) == m


def test_unknown_key_id_is_refused_naming_it() -> None:
    data = encode(fixed_manifest(), KEY_B)
    message = signature_error(data, keys=[KEY_A], expect_model="m", expect_version=3)
    assert message == (
        f"manifest of m v3 is signed with unknown key id {key_id(KEY_B)!r}; "
        "add that key to HOTSWAP_SIGNING_KEYS"
    )


def test_unsigned_manifest_is_refused_when_keys_are_configured() -> None:
    message = signature_error(encode(fixed_manifest()), keys=[KEY_A])
    assert message == (
        "manifest is unsigned, but signing keys are configured; "
        "publish with HOTSWAP_SIGNING_KEYS set"
    )


def test_tampered_tensor_entry_breaks_the_signature() -> None:
    env = unpack(encode(fixed_manifest(), KEY_A))
    body = unpack(env["body"])
    body["tensors"][1][4] = "ef" * 32  # point tensor "b" at other bytes
    env["body"] = pack(body)
    tampered = pack(env)
    message = signature_error(tampered, keys=[KEY_A])
    assert message == (
        f"manifest has a bad signature (key id {key_id(KEY_A)}): it was altered after signing"
    )
    # Without keys the same bytes decode: only the signature catches this.
    assert decode(tampered).by_name()["b"].digest == "ef" * 32


def test_signature_moved_to_another_key_id_is_refused() -> None:
    env = unpack(encode(fixed_manifest(), KEY_B))
    env["kid"] = key_id(KEY_A)
    assert "has a bad signature" in signature_error(pack(env), keys=[KEY_A, KEY_B])


def test_signature_is_checked_before_the_body_is_parsed() -> None:
    data = envelope(b"\xc1garbage", kid=key_id(KEY_A), sig=b"x" * 32)
    assert "has a bad signature" in signature_error(data, keys=[KEY_A])
    assert "not valid msgpack" in format_error(data)


# -- malformed and hostile input -------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x84\xa6format", bytes.fromhex(UNSIGNED_HEX)[:-3], b"\xff" * 50],
)
def test_malformed_msgpack_is_a_format_error(data: bytes) -> None:
    assert format_error(data).startswith("manifest is not valid msgpack: ")


def test_trailing_bytes_are_refused() -> None:
    assert "not valid msgpack" in format_error(bytes.fromhex(UNSIGNED_HEX) + b"\x00")


@pytest.mark.parametrize(
    "env",
    [
        [1, b"", None, None],
        {"format": 1, "body": b""},
        {"format": 1, "body": b"", "kid": None, "sig": None, "extra": 1},
        "manifest",
    ],
)
def test_wrong_envelope_is_a_format_error(env: Any) -> None:
    assert format_error(pack(env)) == "manifest: not a manifest envelope"


@pytest.mark.parametrize("number", [0, 4, 999, "1", None])
def test_unknown_format_number_is_refused(number: object) -> None:
    data = envelope(body_of(fixed_manifest()), format=number)
    assert format_error(data) == (
        f"manifest: format {number!r} is not supported (this hotswap reads 1, 2, 3); upgrade"
    )


@pytest.mark.parametrize(
    ("over", "problem"),
    [
        ({"body": "text"}, "body is not bytes"),
        ({"kid": 5}, "bad key id"),
        ({"sig": "text"}, "bad signature field"),
    ],
)
def test_bad_envelope_fields(over: dict[str, Any], problem: str) -> None:
    env = unpack(encode(fixed_manifest()))
    env.update(over)
    assert format_error(pack(env)) == f"manifest: {problem}"


def test_where_names_model_and_version() -> None:
    data = envelope(body_of(fixed_manifest()), format=4)
    message = format_error(data, expect_model="m", expect_version=3)
    assert message.startswith("manifest of m v3: format 4 is not supported")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("version", 0, "bad version"),
        ("version", True, "bad version"),
        ("version", "3", "bad version"),
        ("parent", -1, "bad parent or rollback target"),
        ("rollback_to", 1.5, "bad parent or rollback target"),
        ("kind", "merge", "unknown kind 'merge'"),
        ("lineage", "", "bad lineage"),
        ("lineage", "x" * 65, "bad lineage"),
        ("created", 17, "bad creation time"),
        ("author", None, "bad author or message"),
        ("model", 7, "bad model"),
    ],
)
def test_bad_body_fields(field: str, value: Any, problem: str) -> None:
    body = body_of(fixed_manifest())
    body[field] = value
    assert format_error(envelope(body)) == f"manifest: {problem}"


def test_missing_or_unknown_body_fields() -> None:
    body = body_of(fixed_manifest())
    del body["author"]
    assert format_error(envelope(body)) == "manifest: fields missing or unknown"
    body = body_of(fixed_manifest())
    body["extra"] = 1
    assert format_error(envelope(body)) == "manifest: fields missing or unknown"


def entry_error(raw_entry: Any, limits: Limits | None = None) -> str:
    body = body_of(fixed_manifest())
    body["tensors"] = [raw_entry]
    return format_error(envelope(body), **({"limits": limits} if limits else {}))


GOOD = ["w", "F32", [2, 3], 24, "ab" * 32, 4096, 1.0, 1.0]


def with_field(index: int, value: Any) -> list[Any]:
    changed = list(GOOD)
    changed[index] = value
    return changed


def test_good_entry_decodes() -> None:
    body = body_of(fixed_manifest())
    body["tensors"] = [GOOD]
    assert decode(envelope(body)).tensors == (
        TensorEntry("w", "F32", (2, 3), 24, "ab" * 32, 4096, 1.0, 1.0),
    )


@pytest.mark.parametrize(
    ("raw_entry", "problem"),
    [
        (GOOD[:7], "manifest: tensor entry is not an 8-field array"),
        ("w", "manifest: tensor entry is not an 8-field array"),
        (with_field(0, ""), "manifest: bad tensor name"),
        (with_field(0, "x" * 1025), "manifest: bad tensor name"),
        (with_field(1, "F128"), "manifest tensor 'w': unknown dtype 'F128'"),
        (with_field(2, [2, -3]), "manifest tensor 'w': bad shape [2, -3]"),
        (with_field(2, [2, 3.0]), "manifest tensor 'w': bad shape [2, 3.0]"),
        (with_field(2, [1] * 65), f"manifest tensor 'w': bad shape {[1] * 65!r}"),
        (with_field(3, 25), "manifest tensor 'w': 25 bytes do not match F32 shape [2, 3]"),
        (with_field(3, -1), "manifest tensor 'w': declares -1 bytes, limit 68719476736"),
        (with_field(4, "AB" * 32), "manifest tensor 'w': bad digest"),
        (with_field(4, "ab" * 31), "manifest tensor 'w': bad digest"),
        (with_field(5, 0), "manifest tensor 'w': bad chunk size 0"),
        (
            with_field(5, MAX_CHUNK_BYTES + 1),
            f"manifest tensor 'w': bad chunk size {MAX_CHUNK_BYTES + 1}",
        ),
        (with_field(6, 1), "manifest tensor 'w': stats are not floats"),
        (with_field(7, None), "manifest tensor 'w': stats are not floats"),
        (with_field(0, 7), "manifest: bad tensor name"),
        (with_field(1, ["F32"]), "manifest tensor 'w': unknown dtype ['F32']"),
        (with_field(2, [True, 6]), "manifest tensor 'w': bad shape [True, 6]"),
        (with_field(2, "2x3"), "manifest tensor 'w': bad shape '2x3'"),
        (with_field(3, True), "manifest tensor 'w': declares True bytes, limit 68719476736"),
        (with_field(3, 24.0), "manifest tensor 'w': declares 24.0 bytes, limit 68719476736"),
        (with_field(4, "ab" * 32 + "\n"), "manifest tensor 'w': bad digest"),
        (with_field(4, b"ab" * 32), "manifest tensor 'w': bad digest"),
        (with_field(5, True), "manifest tensor 'w': bad chunk size True"),
    ],
)
def test_bad_tensor_entries(raw_entry: Any, problem: str) -> None:
    assert entry_error(raw_entry) == problem


def test_absurd_tensor_size_is_refused() -> None:
    # 2**60 float32 elements: consistent with its shape, but far over the limit.
    huge = ["w", "F32", [2**30, 2**30], 2**62, "ab" * 32, 4096, 1.0, 1.0]
    assert entry_error(huge) == (
        f"manifest tensor 'w': declares {2**62} bytes, limit {64 * 1024**3}"
    )
    assert entry_error(GOOD, Limits(max_tensor_bytes=23)) == (
        "manifest tensor 'w': declares 24 bytes, limit 23"
    )


def test_tiny_declared_chunks_are_refused_before_any_chunk_is_counted() -> None:
    # Issue 13, defect 3: chunk_bytes=1 for a 1 MiB tensor declared 1,048,576
    # chunks, each one GET, before the digest could refuse anything.
    mib = ["w", "U8", [MiB], MiB, "ab" * 32, 1, 1.0, 1.0]
    assert entry_error(mib) == (
        "manifest tensor 'w': chunk size 1 declares 1048576 chunks; hotswap cuts chunks of "
        f"at least {MIN_CHUNK_BYTES} bytes (one chunk for a smaller tensor)"
    )
    small = ["w", "U8", [MIN_CHUNK_BYTES - 1], MIN_CHUNK_BYTES - 1, "ab" * 32, 64, 1.0, 1.0]
    assert entry_error(small) == (
        "manifest tensor 'w': chunk size 64 declares 64 chunks; hotswap cuts chunks of "
        f"at least {MIN_CHUNK_BYTES} bytes (one chunk for a smaller tensor)"
    )
    # What is accepted costs at most one chunk per MIN_CHUNK_BYTES, plus one.
    for nbytes, chunk in ((MiB, MIN_CHUNK_BYTES), (5, 5), (0, 1), (MiB + 1, MIN_CHUNK_BYTES)):
        body = body_of(fixed_manifest())
        body["tensors"] = [["w", "U8", [nbytes], nbytes, "ab" * 32, chunk, 1.0, 1.0]]
        (entry,) = decode(envelope(body)).tensors
        assert entry.chunks <= nbytes // MIN_CHUNK_BYTES + 1


def test_shape_product_mismatch_is_refused() -> None:
    lying = ["w", "F32", [2**40, 2**40], 4, "ab" * 32, 4096, 1.0, 1.0]
    assert entry_error(lying) == (
        f"manifest tensor 'w': 4 bytes do not match F32 shape [{2**40}, {2**40}]"
    )


def test_a_billion_declared_tensors_are_refused_without_allocating() -> None:
    # A body whose tensors array header claims 10**9 entries, then ends.
    body = body_of(fixed_manifest())
    del body["tensors"]
    packer = msgpack.Packer(use_bin_type=True)
    raw = packer.pack_map_header(len(body) + 1)
    for k, v in body.items():
        raw += packer.pack(k) + packer.pack(v)
    raw += packer.pack("tensors") + b"\xdd" + (10**9).to_bytes(4, "big")
    started = time.monotonic()
    message = format_error(envelope(raw))
    assert time.monotonic() - started < 1.0
    # Refused from the array header alone, before any entry is read.
    assert message == "manifest: declares more than 100000 tensors"


def body_bytes(body: dict[str, Any], tensors: bytes) -> bytes:
    """Packed ``body`` with the raw bytes ``tensors`` as the value of "tensors"."""
    rest = {k: v for k, v in body.items() if k != "tensors"}
    packer = msgpack.Packer(use_bin_type=True)
    raw = packer.pack_map_header(len(rest) + 1)
    for k, v in rest.items():
        raw += packer.pack(k) + packer.pack(v)
    return bytes(raw + packer.pack("tensors") + tensors)


def peak_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_nested_array_headers_cost_little() -> None:
    # 1000 nested headers each declaring 100,000 elements: msgpack would allocate
    # ~80 KB per level before reading any element if the limits let it.
    nested = (b"\xdd" + (100_000).to_bytes(4, "big")) * 1000
    body = body_of(fixed_manifest())
    for data, problem in [
        (nested, "manifest is not valid msgpack: ValueError: 100000 exceeds max_array_len(16)"),
        (
            # Entries are skipped over (nothing allocated) before each is unpacked.
            envelope(body_bytes(body, nested)),
            "manifest is not valid msgpack: OutOfData: No more data to unpack.",
        ),
        (
            envelope(body_bytes(body, b"\x91" + (b"\xdc\x00\x80") * 1000)),
            "manifest is not valid msgpack: OutOfData: No more data to unpack.",
        ),
    ]:
        assert peak_bytes(data) < 2 * 1024 * 1024
        assert format_error(data) == problem


def test_the_tensor_list_is_read_entry_by_entry() -> None:
    body = body_of(fixed_manifest())
    packed = msgpack.packb(body["tensors"], use_bin_type=True)
    # The same bytes as one unpackb: entries in order, count from the header.
    assert decode(envelope(body_bytes(body, packed))) == fixed_manifest()
    short = b"\x93" + packed[1:]  # declares 3 entries, holds 2
    assert format_error(envelope(body_bytes(body, short))).startswith(
        "manifest is not valid msgpack: OutOfData"
    )
    # A header within max_tensors, an entry with too many fields for an entry.
    wide = b"\x91\xdc\x00\x81" + b"\x00" * 129
    assert format_error(envelope(body_bytes(body, wide))) == (
        "manifest is not valid msgpack: ValueError: 129 exceeds max_array_len(128)"
    )
    # Not an array: the field checks refuse it as before.
    assert format_error(envelope(body_bytes(body, b"\x05"))) == (
        "manifest: declares more than 100000 tensors"
    )


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (pack([1, 2]), "manifest: fields missing or unknown"),
        (pack("body"), "manifest: fields missing or unknown"),
        (b"", "manifest is not valid msgpack: OutOfData: No more data to unpack."),
        (
            pack({**{f"f{i}": i for i in range(33)}}),
            "manifest is not valid msgpack: ValueError: 33 exceeds max_map_len(32)",
        ),
        (
            b"\x81\x01\x02",
            "manifest is not valid msgpack: ValueError: int is not allowed for map key",
        ),
        (
            pack(body_of(fixed_manifest())) + b"\x00",
            "manifest is not valid msgpack: ValueError: 1 bytes after the end",
        ),
    ],
)
def test_malformed_bodies(raw: bytes, problem: str) -> None:
    assert format_error(envelope(raw)) == problem


def test_tensor_count_limit() -> None:
    body = body_of(fixed_manifest())
    assert format_error(envelope(body), limits=Limits(max_tensors=1)) == (
        "manifest: declares more than 1 tensors"
    )
    assert len(decode(envelope(body), limits=Limits(max_tensors=2)).tensors) == 2


def test_manifest_size_limit() -> None:
    data = encode(fixed_manifest())
    assert format_error(data, limits=Limits(max_manifest_bytes=100)) == (
        f"manifest is {len(data)} bytes, over the 100 limit"
    )


def test_duplicate_tensor_names_are_refused() -> None:
    body = body_of(fixed_manifest())
    body["tensors"] = [GOOD, GOOD]
    assert format_error(envelope(body)) == "manifest: duplicate tensor names"


def test_manifest_of_another_model_or_version_is_refused() -> None:
    data = encode(fixed_manifest())
    assert format_error(data, expect_model="other", expect_version=3) == (
        "manifest of other v3: belongs to model 'm'"
    )
    assert format_error(data, expect_model="m", expect_version=4) == (
        "manifest of m v4: says it is version 3"
    )


# -- what encode refuses (decode would refuse it later, on every agent) ----------


def test_encode_refuses_an_oversized_message() -> None:
    m = derive(fixed_manifest(), message="x" * (MAX_MESSAGE_LEN + 1))
    with pytest.raises(ConfigError) as e:
        encode(m)
    assert str(e.value) == (
        f"manifest of m v3: message is {MAX_MESSAGE_LEN + 1} bytes, limit {MAX_MESSAGE_LEN}"
    )
    longest = derive(fixed_manifest(), message="x" * MAX_MESSAGE_LEN)
    assert decode(encode(longest)).message == longest.message


def test_encode_refuses_names_and_ranks_decode_would_refuse() -> None:
    base = fixed_manifest()
    long_name = TensorEntry("n" * 1025, "U8", (1,), 1, "ab" * 32, 4096, 0.0, 0.0)
    with pytest.raises(SourceError, match=r"has 1025 characters, need 1-1024; rename it"):
        encode(derive(base, tensors=(long_name,)))
    deep = TensorEntry("deep", "U8", (1,) * 65, 1, "ab" * 32, 4096, 0.0, 0.0)
    with pytest.raises(SourceError) as e:
        encode(derive(base, tensors=(deep,)))
    assert str(e.value) == "manifest of m v3: tensor 'deep' has 65 dimensions, limit 64"


# -- nothing on the wire is ever unpickled or executed ---------------------------

ROOT = Path(__file__).resolve().parent.parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Pickle imports, eval/exec, and torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where} from {node.module} import")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where} from torch import load")
        elif isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            # x.eval() is nn.Module.eval, not the builtin.
            builtin = isinstance(f, ast.Name) or (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id == "builtins"
            )
            if name in {"eval", "exec", "__import__"} and builtin:
                found.append(f"{where} {name}()")
            if name == "load" and isinstance(f, ast.Attribute):
                owner = f.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = any(
                        k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    if not safe:
                        found.append(f"{where} torch.load without weights_only=True")
            for k in node.keywords:
                if k.arg == "allow_pickle" and not (
                    isinstance(k.value, ast.Constant) and k.value.value is False
                ):
                    found.append(f"{where} allow_pickle")
    return found


def test_the_package_never_unpickles_or_executes() -> None:
    files = sorted((ROOT / "hotswap").rglob("*.py")) + sorted((ROOT / "publisher").rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in unsafe_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import os, dill",
        "from pickle import loads",
        "from torch import load",
        "eval('1')",
        "exec(code)",
        "builtins.eval(x)",
        "torch.load('x.pt')",
        "torch.load('x.pt', weights_only=False)",
        "torch.load(f, map_location='cpu', weights_only=flag)",
        "np.load('x.npy', allow_pickle=True)",
    ],
)
def test_the_scanner_catches_each_pattern(source: str) -> None:
    assert len(unsafe_calls(source)) == 1


def test_the_scanner_accepts_safe_loading() -> None:
    assert unsafe_calls("model.eval()") == []
    assert unsafe_calls("torch.load(path, map_location='cpu', weights_only=True)") == []
    assert unsafe_calls("msgpack.unpackb(data, raw=False)\nsafetensors.torch.load_file(p)") == []


def test_entry_cache_reuses_entries_whose_bytes_it_has_seen() -> None:
    cache = EntryCache()
    first = decode(encode(fixed_manifest()), cache=cache)
    changed = TensorEntry("b", "F32", (2,), 8, "ef" * 32, 65536, 2.5, 2.0)
    nxt = derive(fixed_manifest(), version=4, tensors=(changed, fixed_manifest().tensors[0]))
    second = decode(encode(nxt), cache=cache)
    assert second == nxt
    assert second.tensors[0] is first.tensors[0]  # "a": same bytes, same object
    assert second.tensors[1] == changed and second.tensors[1] is not first.tensors[1]
    # Without the cache every entry is new.
    assert decode(encode(nxt)).tensors[0] is not first.tensors[0]


def test_entry_cache_checks_again_under_other_limits() -> None:
    cache = EntryCache()
    data = encode(fixed_manifest())
    decode(data, cache=cache)
    tight = Limits(max_tensor_bytes=4)
    with pytest.raises(FormatError) as e:
        decode(data, cache=cache, limits=tight)
    assert str(e.value) == "manifest tensor 'b': declares 8 bytes, limit 4"
    assert decode(data, cache=cache) == fixed_manifest()


def test_entry_cache_keeps_nothing_from_a_refused_manifest() -> None:
    cache = EntryCache()
    good = decode(encode(fixed_manifest()), cache=cache)
    body = body_of(fixed_manifest())
    body["tensors"].append(["c", "F32", [1], 5, "ab" * 32, 4096, 1.0, 1.0])
    with pytest.raises(FormatError, match=r"^manifest tensor 'c': 5 bytes do not match F32"):
        decode(envelope(body), cache=cache)
    assert decode(encode(fixed_manifest()), cache=cache).tensors[0] is good.tensors[0]


# -- delta entries (issue 14) ---------------------------------------------------------


def delta_manifest(**delta: Any) -> Manifest:
    ref = DeltaRef(
        encodings=("sparse-zstd",),
        base="ef" * 32,
        blob="12" * 32,
        stored_bytes=100,
        frames_digest="34" * 32,
        chain_bytes=100,
    )
    ref = replace(ref, **delta)
    entry = TensorEntry("b", "F32", (2,), 8, "ab" * 32, 65536, 1.5, 1.0, ref)
    return replace(fixed_manifest(), tensors=(entry, fixed_manifest().by_name()["a"]))


def test_a_delta_entry_round_trips_in_format_2_and_full_manifests_stay_format_1() -> None:
    m = delta_manifest(keyframe=True)
    data = encode(m)
    assert unpack(data)["format"] == FORMAT_DELTA
    back = decode(data)
    assert back == m and back.by_name()["b"].delta == m.by_name()["b"].delta
    assert unpack(encode(fixed_manifest()))["format"] == FORMAT  # old agents still read it


def test_a_delta_entry_in_a_format_1_manifest_is_refused() -> None:
    body = unpack(unpack(encode(delta_manifest()))["body"])
    assert format_error(envelope(body)) == "manifest: a delta entry in a format 1 manifest"


@pytest.mark.parametrize(
    ("delta", "problem"),
    [
        ({"base": "ab" * 32}, "delta from a content to itself"),
        ({"base": "xyz"}, "bad delta base"),
        ({"stored_bytes": 0}, "delta declares 0 stored bytes"),
        ({"encodings": ()}, "bad delta encodings []"),
        ({"depth": 0}, "delta chain depth 0 is not 1-64"),
        ({"chain_bytes": 99}, "delta chain declares 99 stored bytes"),
    ],
)
def test_bad_delta_fields_are_refused(delta: dict[str, Any], problem: str) -> None:
    body = unpack(unpack(encode(delta_manifest()))["body"])
    ref = DeltaRef(**{**delta_manifest().by_name()["b"].delta.__dict__, **delta})  # type: ignore[union-attr]
    body["tensors"][1][8] = ref.wire()  # "b" (entries are sorted by name)
    data = envelope(body, format=FORMAT_DELTA)
    assert format_error(data) == f"manifest tensor 'b': {problem}"
