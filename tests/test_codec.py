"""Codec: bit-exact bytes for every dtype and layout, digests, stats (no server)."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import codec
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
