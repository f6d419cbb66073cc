"""Delta frames: bit-exact round trips, symmetry, the wire header, every refusal (no server)."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
import zstandard

from hotswap import chain, codec, delta, dtypes, encodings
from hotswap.encodings import Encoding
from hotswap.errors import ConfigError, FormatError, IntegrityError

KiB = 1024
NAMES = sorted(codec.DTYPES)


def b3(data: bytes | bytearray | memoryview) -> bytes:
    return bytes(blake3.blake3(data).digest())


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def change_elements(data: bytes, itemsize: int, fraction: float, seed: int) -> bytes:
    """``data`` with about ``fraction`` of its elements given new random bytes."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    count = len(data) // itemsize
    for i in rng.choice(count, size=max(1, int(count * fraction)), replace=False):
        start = int(i) * itemsize
        out[start : start + itemsize] = rng.integers(0, 256, itemsize, dtype=np.uint8).tobytes()
    return bytes(out)


def roundtrip(new: bytes, base: bytes, chunk: int, frames: list[bytes]) -> None:
    """Frames take base to new, new back to base, and decode in place."""
    out = bytearray(len(new))
    delta.decode(frames, memoryview(base), memoryview(out), chunk)
    assert out == new
    delta.decode(frames, memoryview(new), memoryview(out), chunk, backwards=True)
    assert out == base
    inplace = bytearray(base)
    delta.decode(frames, memoryview(inplace), memoryview(inplace), chunk)
    assert inplace == new


def frames_of(new: bytes, base: bytes, chunk: int, itemsize: int = 1) -> list[bytes]:
    """Every chunk's frame, whether or not a delta would pay (``encode`` may say None)."""
    return [
        delta.encode_frame(new[s:e], base[s:e], itemsize=itemsize)
        for s, e in codec.chunk_spans(len(new), chunk)
    ]


def forced_frames(
    new: bytes, base: bytes, chunk: int, itemsize: int, encoding: Encoding
) -> list[bytes]:
    return [
        delta.encode_frame(new[s:e], base[s:e], itemsize=itemsize, encoding=encoding)
        for s, e in codec.chunk_spans(len(new), chunk)
    ]


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_dtype_round_trips_bit_exact_sparse_and_random(name: str) -> None:
    itemsize = dtypes.DTYPES[name].itemsize
    shape = (37, 29)  # odd sizes: the last chunk is short for every item size
    nbytes = math.prod(shape) * itemsize
    base_t = codec.from_bytes(bytearray(random_bytes(nbytes, 1)), name, shape)
    base = bytes(codec.as_bytes(base_t))
    sparse = change_elements(base, itemsize, 0.02, 2)
    chunk = 1000  # not a multiple of any item size
    frames = delta.encode(
        memoryview(sparse), memoryview(base), chunk, itemsize=itemsize, max_fraction=1.0
    )
    assert frames is not None and len(frames) == math.ceil(nbytes / chunk)
    assert delta.encodings_used(frames) == {Encoding.SPARSE_ZSTD}
    roundtrip(sparse, base, chunk, frames)
    for forced in Encoding:  # either payload encoding, on the same changes
        roundtrip(sparse, base, chunk, forced_frames(sparse, base, chunk, itemsize, forced))
    # Decoded bytes make the same tensor, NaN payloads and all.
    out = bytearray(nbytes)
    delta.decode(frames, memoryview(base), memoryview(out), chunk)
    assert bytes(codec.as_bytes(codec.from_bytes(out, name, shape))) == sparse
    other = random_bytes(nbytes, 3)
    dense = frames_of(other, base, chunk, itemsize)
    # Dense changes: byte planes shuffled where elements are wider than a byte.
    assert delta.encodings_used(dense) == {
        Encoding.SHUFFLE_ZSTD if encodings.element_width(itemsize, e - s) > 1 else Encoding.XOR_ZSTD
        for s, e in codec.chunk_spans(nbytes, chunk)
    }
    roundtrip(other, base, chunk, dense)


@pytest.mark.parametrize(
    ("dtype", "relative"), [(torch.bfloat16, 1e-4), (torch.float16, 2e-5), (torch.float32, 1e-4)]
)
def test_a_training_step_round_trips_and_is_small(dtype: torch.dtype, relative: float) -> None:
    g = torch.Generator().manual_seed(0)
    master = torch.randn(300_001, generator=g) * 0.02
    moved = master * (1 + relative * torch.randn(master.numel(), generator=g))
    base, new = bytes(codec.as_bytes(master.to(dtype))), bytes(codec.as_bytes(moved.to(dtype)))
    assert base != new
    chunk = 64 * KiB
    frames = delta.encode(memoryview(new), memoryview(base), chunk, itemsize=dtype.itemsize)
    assert frames is not None
    assert sum(map(len, frames)) <= delta.MAX_DELTA_FRACTION * len(new)
    # A float32 fine-tune changes every element (shuffled XOR), a bf16 step a few (patch).
    assert delta.encodings_used(frames) == (
        {Encoding.SHUFFLE_ZSTD} if dtype == torch.float32 else {Encoding.SPARSE_ZSTD}
    )
    assert delta.read_header(frames[-1]).length == len(new) % chunk
    roundtrip(new, base, chunk, frames)


def test_each_frame_decodes_alone_against_its_range() -> None:
    base = random_bytes(10 * KiB + 7, 4)
    new = change_elements(base, 2, 0.01, 5)
    frames = delta.encode(memoryview(new), memoryview(base), 4 * KiB)
    assert frames is not None and len(frames) == 3
    out = bytearray(len(new) - 8 * KiB)
    delta.decode_frame(frames[2], base[8 * KiB :], memoryview(out))
    assert out == new[8 * KiB :]


def test_xor_is_symmetric_the_forward_delta_takes_the_result_back() -> None:
    p = random_bytes(5000, 6)
    c = change_elements(p, 4, 0.05, 7)
    for encoding in Encoding:
        frame = delta.encode_frame(c, p, itemsize=4, encoding=encoding)
        back = delta.encode_frame(p, c, itemsize=4, encoding=encoding)
        out = bytearray(5000)
        delta.decode_frame(frame, c, memoryview(out), backwards=True)
        assert out == p
        # The reverse delta carries the same payload, its digests swapped.
        assert frame[delta.HEADER_BYTES :] == back[delta.HEADER_BYTES :]
        h, r = delta.read_header(frame), delta.read_header(back)
        assert (h.base_digest, h.result_digest) == (r.result_digest, r.base_digest)


def test_encode_refuses_unrelated_weights_and_deltas_over_the_limit() -> None:
    base = random_bytes(64 * KiB, 8)
    assert delta.encode(memoryview(random_bytes(64 * KiB, 9)), memoryview(base), 4096) is None
    close = change_elements(base, 2, 0.2, 10)
    assert delta.encode(memoryview(close), memoryview(base), 4096) is not None
    assert delta.encode(memoryview(close), memoryview(base), 4096, max_fraction=0.05) is None
    assert delta.encode(memoryview(b""), memoryview(b""), 4096) is None


def test_a_chain_of_encodes_reuses_the_digests_of_the_last_result() -> None:
    v1 = random_bytes(10 * KiB, 15)
    v2 = change_elements(v1, 2, 0.01, 16)
    v3 = change_elements(v2, 2, 0.01, 17)
    first = delta.encode(memoryview(v2), memoryview(v1), 4 * KiB, itemsize=2)
    assert first is not None
    known = delta.result_digests(first)
    assert known == [b3(v2[s:e]) for s, e in codec.chunk_spans(len(v2), 4 * KiB)]
    second = delta.encode(memoryview(v3), memoryview(v2), 4 * KiB, itemsize=2, base_digests=known)
    assert second == delta.encode(memoryview(v3), memoryview(v2), 4 * KiB, itemsize=2)
    with pytest.raises(ConfigError) as e:
        delta.encode(memoryview(v3), memoryview(v2), 4 * KiB, base_digests=known[:2])
    assert str(e.value) == "delta: 2 base digests for 3 chunks"


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError) as e:
        delta.encode(memoryview(b"ab"), memoryview(b"abc"), 4)
    assert str(e.value) == "delta: new bytes are 2, base 3"
    with pytest.raises(ConfigError) as e:
        delta.encode(memoryview(b"ab"), memoryview(b"ab"), 0)
    assert str(e.value) == f"delta: chunk size 0 is outside 1-{delta.MAX_CHUNK_BYTES}"
    with pytest.raises(ConfigError) as e:
        delta.encode_frame(b"ab", b"abc")
    assert str(e.value) == "delta frame: new chunk is 2 bytes, base 3"
    with pytest.raises(ConfigError) as e:
        delta.encode_frame(b"abcd", b"wxyz", itemsize=2, encoding=Encoding.SPARSE_ZSTD)
    assert str(e.value) == (
        "delta frame: 2 changed elements of 2 bytes do not fit a sparse patch of a 4-byte chunk"
    )


# -- the wire format -----------------------------------------------------------------


def test_golden_header_bytes() -> None:
    base, new = b"\x01\x02\x03\x04", b"\x01\x02\x03\x05"
    frame = delta.encode_frame(new, base)
    assert frame[:10] == b"HSD" + bytes([1, 1, 0]) + struct.pack("<I", 4)
    assert frame[10:42] == b3(base)
    assert frame[42:74] == b3(new)
    assert delta.HEADER_BYTES == 74
    payload = zstandard.ZstdDecompressor().decompress(frame[74:])
    assert payload == b"\x00\x00\x00\x01"
    assert Encoding.XOR_ZSTD.wire_name == "xor-zstd"
    assert encodings.encoding_from_name("xor-zstd") is Encoding.XOR_ZSTD
    assert encodings.encoding_from_name("sparse-zstd") is Encoding.SPARSE_ZSTD


def test_golden_sparse_payload() -> None:
    base = bytes(16)
    new = bytearray(base)
    new[6:8] = b"\x34\x12"  # element 3 of eight 2-byte elements
    frame = delta.encode_frame(bytes(new), base, itemsize=2)
    assert frame[4] == Encoding.SPARSE_ZSTD
    payload = frame[delta.HEADER_BYTES :]
    assert payload[:5] == b"\x02" + struct.pack("<I", 1)  # width 2, one change
    body = zstandard.ZstdDecompressor().decompress(payload[5:])
    assert body == struct.pack("<I", 3) + b"\x34\x12"  # gap from 0, then the XOR value


def test_known_digests_are_written_as_given() -> None:
    frame = delta.encode_frame(b"ab", b"ac", base_digest=b"B" * 32, result_digest=b"R" * 32)
    h = delta.read_header(frame)
    assert (h.base_digest, h.result_digest, h.length) == (b"B" * 32, b"R" * 32, 2)


def test_unknown_encoding_name_says_upgrade() -> None:
    with pytest.raises(FormatError) as e:
        encodings.encoding_from_name("xor-brotli")
    assert str(e.value) == (
        "unknown delta encoding 'xor-brotli' (this hotswap knows shuffle-zstd, sparse-zstd, "
        "xor-zstd); upgrade hotswap"
    )


# -- refusals --------------------------------------------------------------------------

BASE = random_bytes(3000, 11)
NEW = change_elements(BASE, 2, 0.03, 12)
FRAME = delta.encode_frame(NEW, BASE, encoding=Encoding.XOR_ZSTD)
HEADER = FRAME[: delta.HEADER_BYTES]
SPARSE = delta.encode_frame(NEW, BASE, itemsize=2)
SPARSE_HEADER = SPARSE[: delta.HEADER_BYTES]


def with_header(**fields: int) -> bytes:
    magic, version, encoding, flags, length, base, result = delta.HEADER.unpack_from(FRAME)
    values = {"version": version, "encoding": encoding, "flags": flags, "length": length}
    values.update(fields)
    packed = delta.HEADER.pack(
        magic,
        values["version"],
        values["encoding"],
        values["flags"],
        values["length"],
        base,
        result,
    )
    return packed + FRAME[delta.HEADER_BYTES :]


def refusal(frame: bytes, *, out_len: int = 3000, base: bytes = BASE) -> FormatError:
    with pytest.raises(FormatError) as e:
        delta.decode_frame(frame, base, memoryview(bytearray(out_len)), where="m v2 tensor 'w'")
    return e.value


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"HSD\x01", "m v2 tensor 'w': 4 bytes, shorter than a frame header"),
        (b"XSD" + FRAME[3:], "m v2 tensor 'w': not a delta frame (magic b'XSD')"),
        (
            with_header(version=2),
            "m v2 tensor 'w': frame format 2 is not supported (this hotswap reads 1); "
            "upgrade hotswap",
        ),
        (
            with_header(encoding=9),
            "m v2 tensor 'w': unknown encoding id 9 (this hotswap knows 1 xor-zstd, "
            "2 sparse-zstd, 3 shuffle-zstd); upgrade hotswap",
        ),
        (with_header(flags=1), "m v2 tensor 'w': unknown flags 0x01"),
        (
            with_header(length=2999),
            "m v2 tensor 'w': declares 2999 bytes, the chunk is 3000 (base 3000)",
        ),
        (
            HEADER + zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 3000),
            "m v2 tensor 'w': payload declares no size, expected 3000 bytes",
        ),
        (
            HEADER + zstandard.ZstdCompressor().compress(b"\0" * 3001),
            "m v2 tensor 'w': payload declares 3001 bytes, expected 3000 bytes",
        ),
    ],
)
def test_malformed_frames_are_refused_with_one_line(frame: bytes, message: str) -> None:
    assert str(refusal(frame)) == message


def test_base_or_out_of_another_length_is_refused() -> None:
    assert str(refusal(FRAME, out_len=2999)) == (
        "m v2 tensor 'w': declares 3000 bytes, the chunk is 2999 (base 3000)"
    )
    assert str(refusal(FRAME, base=BASE[:-1])) == (
        "m v2 tensor 'w': declares 3000 bytes, the chunk is 3000 (base 2999)"
    )


def test_payloads_that_do_not_decode_to_the_declared_size_are_refused() -> None:
    prefix = "m v2 tensor 'w': payload does not decode to 3000 bytes ("
    assert str(refusal(FRAME[:-3])).startswith(prefix)  # truncated
    assert str(refusal(FRAME + b"\0")).startswith(prefix)  # trailing bytes
    assert str(refusal(HEADER + lying_size(b"\1" * 2000, 3000))).startswith(prefix)  # fewer
    assert str(refusal(HEADER + b"\x28\xb5\x2f\xfd" + b"\xff" * 20)).startswith(
        "m v2 tensor 'w': payload "
    )
    assert str(refusal(HEADER + b"not zstd at all")).startswith(
        "m v2 tensor 'w': payload is not a zstd frame ("
    )


def sparse_payload(width: int, count: int, body: bytes) -> bytes:
    return (
        SPARSE_HEADER + struct.pack("<BI", width, count) + zstandard.ZstdCompressor().compress(body)
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (SPARSE_HEADER + b"\x02", "m v2 tensor 'w': sparse payload of 1 bytes has no head"),
        (sparse_payload(3, 1, b""), "m v2 tensor 'w': element width 3 does not tile 3000 bytes"),
        (sparse_payload(16, 1, b""), "m v2 tensor 'w': element width 16 does not tile 3000 bytes"),
        (
            sparse_payload(2, 501, bytes(501 * 6)),
            "m v2 tensor 'w': 501 changed elements of 2 bytes do not fit 3000 bytes",
        ),
        (
            sparse_payload(2, 2, struct.pack("<II", 5, 0) + b"abcd"),
            "m v2 tensor 'w': sparse indices do not rise within the chunk",
        ),
        (
            sparse_payload(2, 1, struct.pack("<I", 1500) + b"ab"),
            "m v2 tensor 'w': sparse indices do not rise within the chunk",
        ),
        (
            sparse_payload(2, 2, struct.pack("<II", 1000, 2**32 - 1) + b"abcd"),
            "m v2 tensor 'w': sparse indices do not rise within the chunk",
        ),
        (
            sparse_payload(2, 2, struct.pack("<I", 7) + b"ab"),
            "m v2 tensor 'w': payload declares 6 bytes, expected 12 bytes",
        ),
    ],
)
def test_malformed_sparse_patches_are_refused(frame: bytes, message: str) -> None:
    assert delta.read_header(SPARSE).encoding is Encoding.SPARSE_ZSTD
    assert str(refusal(frame)) == message


def test_a_sparse_patch_at_the_last_element_is_applied() -> None:
    body = struct.pack("<I", 1499) + b"\x01\x00"
    new = bytearray(BASE)
    new[2998] ^= 1
    frame = (
        delta.HEADER.pack(
            delta.MAGIC, delta.FORMAT, Encoding.SPARSE_ZSTD, 0, 3000, b3(BASE), b3(new)
        )
        + struct.pack("<BI", 2, 1)
        + zstandard.ZstdCompressor().compress(body)
    )
    out = bytearray(3000)
    delta.decode_frame(frame, BASE, memoryview(out))
    assert out == new


def test_a_corrupted_payload_or_the_wrong_base_is_an_integrity_error() -> None:
    # A well-formed payload that decodes to other bytes than the header promises.
    other = change_elements(BASE, 2, 0.03, 14)
    bad = HEADER + delta.encode_frame(other, BASE, encoding=Encoding.XOR_ZSTD)[delta.HEADER_BYTES :]
    out = bytearray(3000)
    with pytest.raises(IntegrityError) as e:
        delta.decode_frame(bad, BASE, memoryview(out), where="w")
    assert type(e.value) is IntegrityError
    assert out == other
    got = b3(other).hex()[:16]
    assert str(e.value) == (
        f"w: decoded bytes hash to {got}..., the frame says {b3(NEW).hex()[:16]}... "
        "(the frame is corrupted); fetch the full blob"
    )
    wrong = change_elements(BASE, 2, 0.01, 13)
    with pytest.raises(IntegrityError) as e:
        delta.decode_frame(FRAME, wrong, memoryview(out), where="w")
    assert str(e.value).endswith(
        "(the base bytes are not the ones the delta starts from); fetch the full blob"
    )
    inplace = bytearray(wrong)
    with pytest.raises(IntegrityError) as e:
        delta.decode_frame(FRAME, inplace, memoryview(inplace), where="w")
    assert str(e.value).endswith(
        "(the frame is corrupted or the base was not its start); fetch the full blob"
    )
    with pytest.raises(IntegrityError) as e:
        delta.decode_frame(FRAME, BASE, memoryview(out), backwards=True, where="w")
    assert f"the frame says {b3(BASE).hex()[:16]}..." in str(e.value)


def test_whole_tensor_decode_refuses_counts_and_lengths_that_do_not_fit() -> None:
    frames = frames_of(NEW, BASE, 1000)
    out = memoryview(bytearray(3000))
    with pytest.raises(FormatError) as e:
        delta.decode(frames[:2], memoryview(BASE), out, 1000, where="m v2 tensor 'w'")
    assert str(e.value) == "m v2 tensor 'w': 2 frames for 3 chunks of 1000 bytes"
    with pytest.raises(FormatError) as e:
        delta.decode(frames, memoryview(BASE[:-1]), out, 1000, where="m v2 tensor 'w'")
    assert str(e.value) == "m v2 tensor 'w': base is 2999 bytes, the tensor 3000"
    swapped = [frames[1], frames[0], frames[2]]
    with pytest.raises(IntegrityError) as e:
        delta.decode(swapped, memoryview(BASE), out, 1000, where="m v2 tensor 'w'")
    assert str(e.value).startswith("m v2 tensor 'w' chunk 0: decoded bytes hash to ")


# -- bombs -----------------------------------------------------------------------------


def lying_size(data: bytes, claim: int) -> bytes:
    """A zstd frame of ``data`` whose header claims ``claim`` bytes of content (2-byte field)."""
    frame = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(data)
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    descriptor = frame[4]
    assert descriptor & 0xE3 == 0  # no size, no single segment, no dictionary
    # Frame_Content_Size_flag 1: a 2-byte field holding the size minus 256.
    return (
        frame[:4]
        + bytes([descriptor | 0x40])
        + frame[5:6]  # the window descriptor
        + struct.pack("<H", claim - 256)
        + frame[6:]
    )


def peak_while(fn: object) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda: lying_size(b"\0" * (64 << 20), 4096), id="claims 4 KiB, holds 64 MiB"),
        pytest.param(
            lambda: zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 << 20)),
            id="no size, holds 64 MiB",
        ),
        pytest.param(
            lambda: zstandard.ZstdCompressor().compress(b"\0" * (64 << 20)), id="claims 64 MiB"
        ),
    ],
)
def test_a_zstd_bomb_stops_at_the_declared_size(payload: object) -> None:
    bomb = HEADER[:6] + struct.pack("<I", 4096) + HEADER[10:] + payload()  # type: ignore[operator]
    assert len(bomb) < 64 * KiB
    base = bytes(4096)
    peak = peak_while(lambda: delta.decode_frame(bomb, base, memoryview(bytearray(4096))))
    # The output is allocated at the declared size at most, never at the claim.
    assert peak < 256 * KiB


def test_a_frame_claiming_gigabytes_is_refused_before_anything_is_allocated() -> None:
    huge = HEADER[:6] + struct.pack("<I", 2**31) + HEADER[10:]
    payload = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    peak = peak_while(lambda: delta.decode_frame(huge + payload, b"", memoryview(bytearray(0))))
    assert peak < 64 * KiB


# -- the measurement behind the choice ---------------------------------------------------


def test_the_delta_bench_runs_and_the_default_keyframe_policy_meets_the_targets() -> None:
    """``python -m bench.delta_codec --quick``: every candidate round-trips (the bench
    checks), random weights are refused, and in its model of an RL run (gc to 10 kept
    versions after each publish) the default keyframe policy keeps issue 14's targets
    at the 1.5%-changed bf16 step: Redis <= 1.5x the tensor on average, <= 2.2x at
    most, in+out <= 5% of a full transfer. Timings are not checked here."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "bench.delta_codec", "--quick"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"\| bfloat16 random new weights \| refused \|", done.stdout)
    assert re.search(r"\| float32 random new weights \| refused \|", done.stdout)
    rows = re.findall(
        rf"^\| ([\d.]+) \| {chain.MAX_CHAIN} \(default\) \| {chain.KEYFRAME_FRACTION} "
        r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| (\d+) \|$",
        done.stdout,
        re.MULTILINE,
    )
    assert len(rows) == 4, done.stdout  # the 1%, 1.5%, 3% and 8% steps
    pct, avg, top, moved, _ = rows[1]
    assert float(pct) < 5
    assert float(avg) <= 1.5 and float(top) <= 2.2 and float(moved) <= 5.0
    assert all(int(r[4]) <= chain.MAX_CHAIN for r in rows)


def test_a_dense_fine_tune_step_over_the_limit_costs_a_glance_not_an_encode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every fp32 element changed by ~1e-4: its shuffled XOR compresses to about
    two fifths of the tensor; under a lower limit no frame is encoded."""
    g = torch.Generator().manual_seed(3)
    old = torch.randn(1 << 20, generator=g)
    new = old * (1 + 1e-4 * torch.randn(old.shape, generator=g))
    encoded: list[int] = []
    real = delta.encode_frame

    def counted(*args: object, **kwargs: object) -> bytes:
        encoded.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta, "encode_frame", counted)
    new_b, old_b = codec.as_bytes(new), codec.as_bytes(old)
    assert delta.encode(new_b, old_b, 1 << 20, itemsize=4, max_fraction=0.3) is None
    assert encoded == []
    frames = delta.encode(new_b, old_b, 1 << 20, itemsize=4)  # the default limit: worth it
    assert frames is not None and len(encoded) == 4
