"""Codec: bit-exact bytes for every dtype and layout, digests, stats (no server)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import codec, dtypes
from hotswap.errors import FormatError, IntegrityError, SourceError

NAMES = sorted(codec.DTYPES)

# Every float, int, uint, bool and complex dtype a torch may have, by attribute.
TORCH_DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex128",
    "complex64",
    "complex32",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]


def raw(x: torch.Tensor) -> bytes:
    return bytes(codec.as_bytes(x))


def tensor_of(data: bytes, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    return codec.from_bytes(bytearray(data), name, shape)


# -- the dtype table -----------------------------------------------------------


@pytest.mark.parametrize("attr", [a for a in TORCH_DTYPES if hasattr(torch, a)])
def test_every_torch_dtype_has_a_wire_name(attr: str) -> None:
    dtype = getattr(torch, attr)
    name = codec.dtype_name(dtype)
    assert codec.DTYPES[name] is dtype
    assert codec.dtype_from_name(name) is dtype
    assert codec.itemsize(name) == dtype.itemsize


def test_wire_names_are_unique_and_safetensors_style() -> None:
    assert len(set(codec.DTYPES.values())) == len(codec.DTYPES)
    assert codec.DTYPES["BF16"] is torch.bfloat16
    assert codec.DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    assert codec.DTYPES["BOOL"] is torch.bool


def test_torch_free_table_agrees_with_torch() -> None:
    # Manifests are checked against hotswap.dtypes, tensors built from codec.DTYPES.
    assert set(codec.DTYPES) <= set(dtypes.DTYPES)
    for name, dtype in codec.DTYPES.items():
        assert dtypes.DTYPES[name] == dtypes.WireDtype(name, dtype.itemsize)
    # Only the newer dtypes this torch lacks are missing from codec's table.
    lacking = {name for name, attr in codec._NEWER if not hasattr(torch, attr)}
    assert set(dtypes.DTYPES) - set(codec.DTYPES) == lacking
    assert codec.chunk_count is dtypes.chunk_count
    assert codec.DIGEST_HEX_LEN == dtypes.DIGEST_HEX_LEN == len(codec.digest(b""))


def test_a_drifted_table_is_named_at_import() -> None:
    newer = [n for n, _ in codec._NEWER]
    assert codec._disagreements(codec.DTYPES, newer, dtypes.DTYPES) == []
    wire = {**dtypes.DTYPES, "BF16": dtypes.WireDtype("BF16", 4), "F6": dtypes.WireDtype("F6", 1)}
    table = {n: d for n, d in codec.DTYPES.items() if n != "I8"} | {"Q8": torch.qint8}
    assert codec._disagreements(table, newer, wire) == [
        "Q8 is not in hotswap.dtypes",
        "F6 is missing here",
        "I8 is missing here",
        "BF16 is 2 bytes here, 4 in hotswap.dtypes",
    ]
    # A newer dtype this torch lacks may be missing from the torch table.
    without = {n: d for n, d in codec.DTYPES.items() if n != "F8_E8M0"}
    assert codec._disagreements(without, newer, dtypes.DTYPES) == []


@pytest.mark.parametrize("name", ["F128", "f32", "", "bfloat16", "F32 "])
def test_unknown_dtype_name_is_a_format_error(name: str) -> None:
    with pytest.raises(FormatError) as e:
        codec.dtype_from_name(name)
    assert str(e.value) == f"unknown dtype {name!r} (this torch knows {len(codec.DTYPES)})"


@pytest.mark.parametrize("name", [None, 3, ["F32"]])
def test_non_string_dtype_name_is_a_format_error(name: object) -> None:
    with pytest.raises(FormatError, match="unknown dtype"):
        codec.dtype_from_name(name)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="unknown dtype"):
        codec.from_bytes(b"", name, (0,))  # type: ignore[arg-type]


def test_unsupported_dtype_is_a_source_error_naming_the_fix() -> None:
    with pytest.raises(SourceError) as e:
        codec.dtype_name(torch.qint8)
    message = str(e.value)
    assert message.startswith("dtype torch.qint8 is not supported: convert the tensor to one of ")
    assert "BF16" in message and "F32" in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_tensor_is_refused_before_any_copy() -> None:
    q = torch.quantize_per_tensor(torch.tensor([0.5, -1.0]), 0.1, 0, torch.qint8)
    with pytest.raises(SourceError, match=r"dtype torch\.qint8 is not supported"):
        codec.as_bytes(q)


# -- bit-exact round trips -------------------------------------------------------

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "transposed": lambda t: t.permute(tuple(reversed(range(t.dim())))),
    "step2": lambda t: t[::2] if t.dim() else t,
    "tail": lambda t: t[1:] if t.dim() else t,
    "last-step3": lambda t: t[..., ::3] if t.dim() else t,
    "expanded": lambda t: t.unsqueeze(0).expand(2, *t.shape),
    "single": lambda t: t.reshape(-1)[1:2] if t.numel() > 1 else t,
}


@st.composite
def strided_tensors(draw: st.DrawFn) -> tuple[str, torch.Tensor, bytes]:
    """A tensor of any wire dtype with arbitrary bit patterns, viewed in an odd layout,
    and the bytes its C-order elements must have (computed from element indices)."""
    name = draw(st.sampled_from(NAMES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    size = codec.itemsize(name)
    count = math.prod(shape)
    data = draw(st.binary(min_size=count * size, max_size=count * size))
    view = VIEWS[draw(st.sampled_from(sorted(VIEWS)))]
    base = tensor_of(data, name, shape)
    order = view(torch.arange(count).reshape(shape)).reshape(-1).tolist()
    expected = b"".join(data[i * size : (i + 1) * size] for i in order)
    return name, view(base), expected


@settings(max_examples=200, deadline=None)
@given(case=strided_tensors(), chunk=st.integers(1, 64))
def test_round_trip_is_bit_exact(case: tuple[str, torch.Tensor, bytes], chunk: int) -> None:
    name, x, expected = case
    buf = codec.as_bytes(x)
    assert buf.format == "B" and buf.ndim == 1
    assert bytes(buf) == expected
    y = codec.from_bytes(bytearray(buf), name, tuple(x.shape))
    assert y.dtype is x.dtype and y.shape == x.shape
    assert raw(y) == expected
    # Chunked transfer reassembles the same bytes.
    spans = codec.chunk_spans(len(buf), chunk)
    assert len(spans) == codec.chunk_count(len(buf), chunk)
    assert all(0 < end - start <= chunk for start, end in spans)
    assert b"".join(bytes(buf[s:e]) for s, e in spans) == expected


NAN_PAYLOADS = [
    ("F32", "<I", [0x7FC01234, 0xFFC00001, 0x7F800001, 0x7FBFFFFF]),
    ("F64", "<Q", [0x7FF8DEADBEEF0001, 0xFFF0000000000001]),
    ("F16", "<H", [0x7E01, 0xFD55, 0x7C01]),
    ("BF16", "<H", [0x7FC1, 0xFF81, 0x7F81]),
    ("C64", "<I", [0x7FC0ABCD, 0xFF800002]),
]


@pytest.mark.parametrize(("name", "fmt", "bits"), NAN_PAYLOADS)
def test_nan_payloads_survive_every_layout(name: str, fmt: str, bits: list[int]) -> None:
    words = bits * 6  # enough for a 2-d shape
    data = b"".join(struct.pack(fmt, w) for w in words)
    elements = len(data) // codec.itemsize(name)
    x = tensor_of(data, name, (2, elements // 2))
    assert torch.isnan(x).any()
    assert raw(x) == data
    # The copies made for strided views keep the payloads too.
    t = x.t()
    assert raw(t) == raw(t.contiguous().view(torch.uint8))
    back = tensor_of(raw(t), name, tuple(t.shape))
    assert raw(back.t()) == data


def test_larger_than_three_chunks() -> None:
    x = torch.arange(1000, dtype=torch.float32).reshape(10, 100)[:, ::2]
    buf = codec.as_bytes(x)
    assert len(buf) == 2000
    spans = codec.chunk_spans(len(buf), 600)
    assert spans == [(0, 600), (600, 1200), (1200, 1800), (1800, 2000)]
    assert codec.chunk_count(2000, 600) == 4
    joined = bytearray(b"".join(bytes(buf[s:e]) for s, e in spans))
    assert torch.equal(codec.from_bytes(joined, "F32", (10, 50)), x)


def test_chunk_arithmetic_edges() -> None:
    assert codec.chunk_count(0, 10) == 0 and codec.chunk_spans(0, 10) == []
    assert codec.chunk_count(10, 10) == 1 and codec.chunk_spans(10, 10) == [(0, 10)]
    assert codec.chunk_count(11, 10) == 2 and codec.chunk_spans(11, 10) == [(0, 10), (10, 11)]


@pytest.mark.parametrize("name", NAMES)
def test_zero_dim_and_empty_tensors(name: str) -> None:
    size = codec.itemsize(name)
    scalar = tensor_of(bytes(range(1, size + 1)), name, ())
    assert scalar.dim() == 0
    assert raw(scalar) == bytes(range(1, size + 1))
    assert codec.from_bytes(bytearray(raw(scalar)), name, ()).shape == ()
    for shape in [(0,), (3, 0), (0, 4, 2)]:
        empty = tensor_of(b"", name, shape)
        assert raw(empty) == b""
        back = codec.from_bytes(b"", name, shape)
        assert back.shape == shape and back.dtype is codec.DTYPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_one_element_views_with_odd_strides(name: str) -> None:
    # x[::2] of two elements is "contiguous" with stride 2: a torch corner case.
    size = codec.itemsize(name)
    x = tensor_of(bytes(range(2 * size)), name, (2,))
    assert raw(x[::2]) == bytes(range(size))
    assert raw(x[1:]) == bytes(range(size, 2 * size))
    assert raw(x.reshape(2, 1).t()[:, :1]) == bytes(range(size))


def test_conjugate_and_negative_views_are_materialised() -> None:
    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    assert raw(z.conj()) == raw(torch.tensor([1 - 2j, -3 + 4j], dtype=torch.complex64))
    n = torch._neg_view(torch.tensor([1.5, -2.0]))
    assert n.is_neg()
    assert raw(n) == raw(torch.tensor([-1.5, 2.0]))


def test_contiguous_cpu_tensor_is_not_copied() -> None:
    x = torch.zeros(4, dtype=torch.float32)
    buf = codec.as_bytes(x)
    x[0] = 1.0
    assert bytes(buf[:4]) == struct.pack("<f", 1.0)
    assert not codec.as_bytes(torch.zeros(2, requires_grad=True)).readonly


def test_from_bytes_shares_a_writable_buffer() -> None:
    buf = bytearray(8)
    t = codec.from_bytes(buf, "I32", (2,))
    buf[0] = 7
    assert t.tolist() == [7, 0]


def test_from_bytes_copies_read_only_memory() -> None:
    data = struct.pack("<2f", 1.0, 2.0)
    for source in (data, memoryview(data)):
        t = codec.from_bytes(source, "F32", (2,))
        t[0] = 5.0
        assert t.tolist() == [5.0, 2.0]
    assert data == struct.pack("<2f", 1.0, 2.0)


def test_from_bytes_refuses_a_wrong_length() -> None:
    with pytest.raises(FormatError) as e:
        codec.from_bytes(bytearray(10), "F32", (2, 2))
    assert str(e.value) == "10 bytes cannot hold a F32 tensor of shape [2, 2] (16 bytes)"


# -- digests ---------------------------------------------------------------------


def test_digest_is_blake3_hex() -> None:
    assert codec.digest(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    data = bytes(range(256)) * 100
    assert codec.digest(data) == blake3.blake3(data).hexdigest()
    assert codec.digest(memoryview(data)) == codec.digest(bytearray(data))


def test_threaded_digest_of_a_large_buffer_equals_single_thread() -> None:
    data = torch.randint(0, 256, (5 * 1024 * 1024,), dtype=torch.uint8).numpy().tobytes()
    assert codec.digest(data) == blake3.blake3(data, max_threads=1).hexdigest()


def test_check_digest_accepts_matching_bytes() -> None:
    data = bytearray(b"weights" * 100)
    codec.check_digest("w", data, codec.digest(data), "model 'm' v3")


def test_check_digest_names_model_version_and_tensor() -> None:
    data = bytearray(b"weights" * 100)
    expected = codec.digest(data)
    data[123] ^= 0x01
    actual = codec.digest(data)
    with pytest.raises(IntegrityError) as e:
        codec.check_digest("layer.0.weight", data, expected, "model 'm' v3")
    assert str(e.value) == (
        f"model 'm' v3 tensor 'layer.0.weight': bytes hash to {actual[:16]}..., the manifest "
        f"says {expected[:16]}... (corrupted in Redis or in transit); run `hotswap verify` "
        "and publish again"
    )


# -- hashing chunks as they land ---------------------------------------------------

CHUNK = 1000


def chunked(n: int = 7 * CHUNK + 321) -> tuple[bytearray, memoryview, int]:
    data = bytearray(torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes())
    return data, memoryview(data), -(-n // CHUNK)


def test_chunk_digest_in_order_equals_the_whole_buffers() -> None:
    data, view, count = chunked()
    hashing = codec.ChunkDigest(view, CHUNK)
    for i in range(count):
        hashing.landed(i, min(CHUNK, len(data) - i * CHUNK))
    assert hashing.hexdigest() == codec.digest(data)


@pytest.mark.parametrize(
    "order",
    [[3, 1, 0, 2, 7, 5, 4, 6], [7, 6, 5, 4, 3, 2, 1, 0], [0, 2, 4, 6], [], [1]],
    ids=["shuffled", "reversed", "some", "none", "not-the-first"],
)
def test_chunk_digest_in_any_order_or_part_equals_the_whole_buffers(order: list[int]) -> None:
    # Per node on a cluster, or a path that reports nothing: the rest is hashed at the end.
    data, view, _ = chunked()
    hashing = codec.ChunkDigest(view, CHUNK)
    for i in order:
        hashing.landed(i)
    assert hashing.hexdigest() == codec.digest(data)


def test_chunk_landing_twice_rehashes_what_the_buffer_holds_now() -> None:
    # A retried read: chunk 0 was hashed, then overwritten by the second attempt.
    data, view, count = chunked()
    hashing = codec.ChunkDigest(view, CHUNK)
    hashing.landed(0)
    hashing.landed(1)
    data[5] ^= 0xFF
    for i in range(count):
        hashing.landed(i)
    assert hashing.hexdigest() == codec.digest(data)
    with pytest.raises(IntegrityError, match="bytes hash to"):
        codec.check_hexdigest("w", hashing.hexdigest(), codec.digest(bytes(data[:5])), "m v1")


def test_chunk_landing_twice_before_it_was_hashed_is_hashed_as_it_is_then() -> None:
    data, view, count = chunked()
    hashing = codec.ChunkDigest(view, CHUNK)
    hashing.landed(2)
    data[2 * CHUNK] ^= 0xFF
    hashing.landed(2)
    for i in range(count):
        if i != 2:
            hashing.landed(i)
    assert hashing.hexdigest() == codec.digest(data)


# -- stats -----------------------------------------------------------------------


def test_stats_of_a_known_tensor() -> None:
    s = codec.stats(torch.tensor([3.0, -4.0]))
    assert s == codec.Stats(5.0, 4.0)
    assert codec.stats(torch.tensor([3, -4], dtype=torch.int8)) == codec.Stats(5.0, 4.0)
    assert codec.stats(torch.tensor([3 + 4j], dtype=torch.complex64)) == codec.Stats(5.0, 5.0)
    assert codec.stats(torch.tensor([True, False, True])).norm == pytest.approx(math.sqrt(2))
    assert codec.stats(torch.empty(0)) == codec.Stats(0.0, 0.0)


def test_stats_flag_non_finite_values() -> None:
    nan = codec.stats(torch.tensor([1.0, float("nan")]))
    assert math.isnan(nan.norm) and math.isnan(nan.max_abs)
    inf = codec.stats(torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16))
    assert math.isinf(inf.norm) and math.isinf(inf.max_abs)


@pytest.mark.parametrize("name", NAMES)
def test_stats_work_for_every_dtype(name: str) -> None:
    size = codec.itemsize(name)
    x = tensor_of(bytes([0x01] * 4 * size), name, (4,))
    s = codec.stats(x)
    assert isinstance(s.norm, float) and isinstance(s.max_abs, float)
    assert s.norm >= 0.0 or math.isnan(s.norm)
    # Deterministic: the same bytes give the same stats (agents recompute them).
    assert codec.stats(tensor_of(raw(x), name, (4,))) == s


# -- stats against an exact float64 reference ------------------------------------------


def values_of(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` ordinary values of wire dtype ``name`` (no NaN or inf), of both signs."""
    dtype = codec.DTYPES[name]
    g = torch.Generator().manual_seed(seed)
    if name == "F4_E2M1_X2":
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        # Built as a view of real pairs: allocating complex32 itself warns.
        real = {torch.complex128: torch.float64, torch.complex64: torch.float32}
        parts = (torch.randn(n, 2, generator=g) * 3).to(real.get(dtype, torch.float16))
        return torch.view_as_complex(parts)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, (n,), dtype=torch.int64, generator=g).to(dtype)


def exact_stats(t: torch.Tensor) -> tuple[float, float]:
    """Norm and max-abs over a whole float64 copy (the slow, obviously right way)."""
    if t.dtype in codec._PACKED:
        t = t.view(torch.uint8)
    t = t.resolve_conj().resolve_neg()
    if t.is_complex():
        wide = torch.view_as_real(t).to(torch.float64)
        magnitude = wide.square().sum(-1).sqrt()
    else:
        magnitude = t.to(torch.float64).abs()
    return float(magnitude.square().sum().sqrt()), float(magnitude.max())


@pytest.mark.parametrize("size", [1, 3, 2 * codec.BLOCK + 17])
@pytest.mark.parametrize("name", NAMES)
def test_stats_agree_with_exact_float64_for_every_dtype(name: str, size: int) -> None:
    x = values_of(name, size)
    norm, max_abs = exact_stats(x)
    s = codec.stats(x)
    assert s.norm == pytest.approx(norm, rel=1e-12)
    # The largest magnitude is one element: exact (complex: its modulus in float64).
    assert s.max_abs == pytest.approx(max_abs, rel=1e-15)
    assert codec.norm(x) == s.norm


def test_stats_beat_float32_accumulation_on_bfloat16_valued_data() -> None:
    # Squares of values with few significant bits, summed in float32, round down
    # on average (7e-8 relative here): the reason stats accumulate in float64.
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    norm, _ = exact_stats(x)
    assert codec.norm(x) == pytest.approx(norm, rel=1e-13)
    assert codec.norm(x.bfloat16()) == pytest.approx(norm, rel=1e-13)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transposed": lambda t: t.view(1100, -1).t(),
    "every-other-column": lambda t: t.view(1100, -1)[:, ::2],
    "rows-longer-than-a-block": lambda t: t.view(2, -1)[:, : codec.BLOCK + 5],
    "expanded": lambda t: t[:1000].unsqueeze(0).expand(1200, 1000),
    "permuted-3d": lambda t: t.view(11, 100, -1).permute(2, 0, 1)[::3],
    "single-element": lambda t: t[7:8],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["F32", "BF16", "F16", "F64", "I32", "C64", "F8_E4M3"])
def test_stats_of_non_contiguous_views(name: str, layout: str) -> None:
    x = LAYOUTS[layout](values_of(name, 1100 * 1000, seed=1))
    assert not x.is_contiguous() or layout == "single-element"
    norm, max_abs = exact_stats(x)
    s = codec.stats(x)
    assert s.norm == pytest.approx(norm, rel=1e-12)
    assert s.max_abs == pytest.approx(max_abs, rel=1e-15)
    assert codec.norm(x) == s.norm


def test_stats_of_lazy_conjugate_and_negative_views() -> None:
    z = values_of("C64", 5000, seed=2)
    assert codec.stats(z.conj()) == codec.stats(z)
    negative = z.conj().imag  # a lazily negated view of the imaginary parts
    assert negative.is_neg()
    assert codec.stats(negative) == codec.stats(z.imag.clone())


def poke(x: torch.Tensor, index: int, value: float) -> None:
    """Set one element (for complex, its real part: writing complex32 warns)."""
    if x.is_complex():
        torch.view_as_real(x)[index, 0] = value
    else:
        x[index] = value


@pytest.mark.parametrize("name", ["F32", "BF16", "F16", "F64", "C64", "C32", "F8_E5M2"])
@pytest.mark.parametrize("where", [0, codec.BLOCK + 1, 2 * codec.BLOCK + 16])
def test_nan_anywhere_makes_both_stats_nan(name: str, where: int) -> None:
    x = values_of(name, 2 * codec.BLOCK + 17, seed=4)
    poke(x, where, math.nan)
    s = codec.stats(x)
    assert math.isnan(s.norm) and math.isnan(s.max_abs)
    assert math.isnan(codec.norm(x))
    strided = codec.stats(x[where % 2 :: 2])
    assert math.isnan(strided.norm) and math.isnan(strided.max_abs)
    poke(x, 5, math.inf)
    assert math.isnan(codec.stats(x).norm) and math.isnan(codec.stats(x).max_abs)


@pytest.mark.parametrize("name", ["F32", "BF16", "F16", "F64", "C64", "C32", "F8_E5M2"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinity_makes_norm_and_max_abs_infinite(name: str, sign: float) -> None:
    x = values_of(name, codec.BLOCK + 3, seed=5)
    poke(x, codec.BLOCK + 1, sign * math.inf)
    assert codec.stats(x) == codec.Stats(math.inf, math.inf)
    assert codec.norm(x) == math.inf


def test_finite_squares_that_overflow_float64_give_an_infinite_norm() -> None:
    s = codec.stats(torch.full((4,), 1e300, dtype=torch.float64))
    assert s == codec.Stats(math.inf, 1e300)


MEMORY_SCRIPT = """
import json, re, torch
from hotswap import codec, dtypes

def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

out = {}
# 64 MiB each, all made (in place) before any is measured.
tensors = [torch.empty((64 << 20) // d.itemsize, dtype=d).normal_()
           for d in (torch.float32, torch.bfloat16, torch.float16)]
codec.stats(tensors[0][:1000])  # lazy set-up before the baseline
for x in tensors:
    for name, fn in [("stats", codec.stats), ("norm", codec.norm)]:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := resident now
        base = status("VmRSS")
        fn(x)
        out[f"{name} {x.dtype}"] = status("VmHWM") - base
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_stats_of_a_large_tensor_use_one_bounded_block() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    extra = json.loads(out.stdout)
    assert len(extra) == 6
    # A float64 block (4 MiB) and, for float16, a float32 one (2 MiB); a copy
    # of the tensor would be 64-128 MiB more.
    assert all(v < 12 * 1024 * 1024 for v in extra.values()), extra
