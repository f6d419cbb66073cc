"""Delta encodings measured: ``python -m bench.delta_codec [--mib 16] [--repeat 3]``.

The data behind the choice of encoding in ``hotswap.delta``: for each kind
of step a training loop publishes, and each candidate encoding, the bytes
stored (% of the full tensor), and encode and decode throughput on one
thread (GB/s = 10^9 bytes of tensor a second, best of ``--repeat``). Every
candidate encodes each chunk of ``--chunk-kib`` on its own (a frame per
chunk, as ``hotswap.delta`` stores them) and every decode is checked
bit-exact. The steps:

* **bf16 RL step**: float32 master weights take one Adam-like step and the
  served bfloat16 copy is rounded again; the step size is set so that the
  given fraction of bfloat16 elements change.
* **fp32 fine-tune step**: every float32 element moves by about 1e-4 of
  itself.
* **random new weights**: nothing shared with the base (the publisher
  should store a full blob).

Then the keyframe policy table of ``bench.delta_chains`` at the delta sizes
just measured.

``blosc2`` and ``lz4`` are not dependencies: they are measured where
installed (``pip install blosc2 lz4``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import zstandard

from bench.delta_chains import print_chains
from hotswap import codec, delta, encodings, workers

MiB = 1024 * 1024
Bytes = npt.NDArray[np.uint8]
# A candidate's encode: (new chunk, base chunk) -> payload; decode: (payload,
# base chunk, out) fills out with the new chunk.
Encode = Callable[[Bytes, Bytes, int], bytes]
Decode = Callable[[bytes, Bytes, Bytes, int], None]


@dataclass(frozen=True)
class Case:
    """One tensor before and after a step, as raw bytes."""

    name: str
    itemsize: int
    base: Bytes
    new: Bytes

    @property
    def changed(self) -> float:
        """Fraction of elements whose bytes differ."""
        width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[self.itemsize]
        return float(np.mean(self.base.view(width) != self.new.view(width)))


@dataclass(frozen=True)
class Candidate:
    name: str
    encode: Encode
    decode: Decode


# -- synthetic steps -----------------------------------------------------------


def _raw(t: torch.Tensor) -> Bytes:
    array: Bytes = np.frombuffer(codec.as_bytes(t).tobytes(), dtype=np.uint8)
    return array


def _adam_direction(n: int, g: torch.Generator) -> torch.Tensor:
    """An Adam update direction m_hat / (sqrt(v_hat) + eps) after a few noisy steps."""
    mean = torch.randn(n, generator=g) * 0.3
    m = torch.zeros(n)
    v = torch.zeros(n)
    beta1, beta2, steps = 0.9, 0.999, 8
    for _ in range(steps):
        grad = mean + torch.randn(n, generator=g)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = m / (1 - beta1**steps)
    v_hat = v / (1 - beta2**steps)
    return m_hat / (v_hat.sqrt() + 1e-8)


def bf16_rl_step(nbytes: int, fraction: float, seed: int) -> Case:
    """bf16 weights before and after an Adam-like step that changes ``fraction`` of them."""
    g = torch.Generator().manual_seed(seed)
    n = nbytes // 2
    master = torch.randn(n, generator=g) * 0.02
    direction = _adam_direction(n, g)
    served = master.to(torch.bfloat16)
    lo, hi = 0.0, 1e-2
    # Bisect the learning rate until the rounded copy changes in ``fraction``.
    for _ in range(40):
        lr = (lo + hi) / 2
        after = (master - lr * direction).to(torch.bfloat16)
        got = float((after.view(torch.int16) != served.view(torch.int16)).float().mean())
        if abs(got - fraction) < fraction / 50:
            break
        lo, hi = (lr, hi) if got < fraction else (lo, lr)
    return Case(f"bf16 RL step, {fraction:.1%} changed", 2, _raw(served), _raw(after))


def fp32_finetune_step(nbytes: int, seed: int) -> Case:
    """fp32 weights before and after every element moved by ~1e-4 of itself."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(nbytes // 4, generator=g) * 0.02
    after = w * (1 + 1e-4 * torch.randn(w.numel(), generator=g))
    return Case("fp32 fine-tune step, 1e-4 relative", 4, _raw(w), _raw(after))


def random_new(nbytes: int, dtype: torch.dtype, seed: int) -> Case:
    """Two unrelated random tensors of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n = nbytes // dtype.itemsize
    a = (torch.randn(n, generator=g) * 0.02).to(dtype)
    b = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return Case(
        f"{str(dtype).removeprefix('torch.')} random new weights", dtype.itemsize, _raw(a), _raw(b)
    )


def cases(nbytes: int, seed: int) -> list[Case]:
    return [
        *(bf16_rl_step(nbytes, f, seed) for f in (0.01, 0.015, 0.03, 0.08)),
        fp32_finetune_step(nbytes, seed),
        random_new(nbytes, torch.bfloat16, seed),
        random_new(nbytes, torch.float32, seed),
    ]


# -- candidates ----------------------------------------------------------------


def _xor(a: Bytes, b: Bytes) -> Bytes:
    out: Bytes = np.bitwise_xor(a, b)
    return out


def _xor_into(data: Bytes, base: Bytes, out: Bytes) -> None:
    np.bitwise_xor(data, base, out=out)


def _zstd(level: int, xor: bool) -> Candidate:
    compressor = zstandard.ZstdCompressor(level=level)
    decompressor = zstandard.ZstdDecompressor()

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        return compressor.compress((_xor(new, base) if xor else new).data)

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        raw = np.frombuffer(decompressor.decompress(payload), dtype=np.uint8)
        if xor:
            _xor_into(raw, base, out)
        else:
            out[:] = raw

    return Candidate(f"{'XOR + ' if xor else ''}zstd {level}", encode, decode)


def _sparse(level: int) -> Candidate:
    """Positions (gaps, uint32) and XOR values of the elements that changed, then zstd."""
    compressor = zstandard.ZstdCompressor(level=level)
    decompressor = zstandard.ZstdDecompressor()
    widths = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        x = _xor(new, base).view(widths[itemsize])
        # nonzero over a boolean mask: much faster than over the integers.
        at = np.flatnonzero(x != 0).astype(np.uint32)
        gaps = np.diff(at, prepend=np.uint32(0)).astype(np.uint32)
        head = np.array([at.size], dtype=np.uint32).tobytes()
        return compressor.compress(head + gaps.tobytes() + x[at].tobytes())

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        raw = decompressor.decompress(payload)
        count = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
        gaps = np.frombuffer(raw, dtype=np.uint32, count=count, offset=4)
        values = np.frombuffer(raw, dtype=widths[itemsize], offset=4 + 4 * count)
        out[:] = base
        target = out.view(widths[itemsize])
        target[np.cumsum(gaps, dtype=np.uint64)] ^= values

    return Candidate(f"sparse index+XOR value + zstd {level}", encode, decode)


def _lz4() -> Candidate | None:
    try:
        block: Any = importlib.import_module("lz4.block")
    except ImportError:
        return None

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        return bytes(block.compress(_xor(new, base), store_size=False))

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        raw = block.decompress(payload, uncompressed_size=len(out))
        _xor_into(np.frombuffer(raw, dtype=np.uint8), base, out)

    return Candidate("XOR + lz4", encode, decode)


def _blosc2(shuffle: str) -> Candidate | None:
    try:
        blosc2: Any = importlib.import_module("blosc2")
    except ImportError:
        return None
    blosc2.set_nthreads(1)
    mode = blosc2.Filter.SHUFFLE if shuffle == "byte" else blosc2.Filter.BITSHUFFLE

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        return bytes(
            blosc2.compress(
                _xor(new, base), typesize=itemsize, clevel=1, filter=mode, codec=blosc2.Codec.ZSTD
            )
        )

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        raw = blosc2.decompress(payload)
        _xor_into(np.frombuffer(raw, dtype=np.uint8), base, out)

    return Candidate(f"XOR + blosc2 {shuffle}-shuffle + zstd 1", encode, decode)


def _hotswap_payload() -> Candidate:
    """``hotswap.encodings`` alone: the payload it chooses per chunk, no header or digests."""

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        encoding, payload = encodings.encode(new, base, itemsize)
        return bytes([encoding]) + payload

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        encoding = encodings.Encoding(payload[0])
        encodings.decode(encoding, memoryview(payload)[1:], base, out, "bench")

    return Candidate(
        "hotswap.encodings (sparse, shuffled XOR or XOR per chunk), payload only", encode, decode
    )


def _hotswap() -> Candidate:
    """``hotswap.delta``'s frames: header, BLAKE3 of both ends (encode) and of the result
    (decode), and the payload chosen per chunk."""

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        return delta.encode_frame(new.data, base.data, itemsize=itemsize)

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        delta.decode_frame(payload, base.data, out.data)

    return Candidate("hotswap.delta frames (with BLAKE3)", encode, decode)


def _hotswap_steady() -> Candidate:
    """``hotswap.delta``'s frames when the publisher kept the base's chunk digests from
    its last delta (``delta.result_digests``): one hash per chunk to encode. The digests
    are taken in the first round, which best-of timing leaves out."""
    kept: dict[tuple[int, int], bytes] = {}

    def encode(new: Bytes, base: Bytes, itemsize: int) -> bytes:
        key = (base.ctypes.data, base.size)
        if key not in kept:
            kept[key] = delta.chunk_digest(base.data)
        return delta.encode_frame(new.data, base.data, itemsize=itemsize, base_digest=kept[key])

    def decode(payload: bytes, base: Bytes, out: Bytes, itemsize: int) -> None:
        delta.decode_frame(payload, base.data, out.data)

    return Candidate("hotswap.delta frames, base digests kept", encode, decode)


def candidates() -> list[Candidate]:
    found = [
        _zstd(1, xor=True),
        _zstd(3, xor=True),
        _lz4(),
        _blosc2("byte"),
        _blosc2("bit"),
        _sparse(1),
        _zstd(1, xor=False),
        _hotswap_payload(),
        _hotswap(),
        _hotswap_steady(),
    ]
    return [c for c in found if c is not None]


# -- measuring -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case: str
    candidate: str
    stored_pct: float
    encode_gbs: float
    decode_gbs: float


def measure(case: Case, cands: list[Candidate], chunk: int, repeat: int) -> list[Row]:
    """Encode and decode every chunk of ``case`` with each candidate; best of ``repeat``.

    Rounds interleave the candidates so that load from other processes on a
    shared machine hits them all alike.
    """
    spans = codec.chunk_spans(case.base.size, chunk)
    out: Bytes = np.empty_like(case.new)
    enc = dict.fromkeys(range(len(cands)), float("inf"))
    dec = dict(enc)
    stored: dict[int, int] = {}
    for _ in range(repeat):
        for k, cand in enumerate(cands):
            started = time.perf_counter()
            frames = [cand.encode(case.new[s:e], case.base[s:e], case.itemsize) for s, e in spans]
            enc[k] = min(enc[k], time.perf_counter() - started)
            out.fill(0)
            started = time.perf_counter()
            for (s, e), frame in zip(spans, frames, strict=True):
                cand.decode(frame, case.base[s:e], out[s:e], case.itemsize)
            dec[k] = min(dec[k], time.perf_counter() - started)
            if not np.array_equal(out, case.new):
                raise AssertionError(f"{cand.name} did not round-trip {case.name}")
            stored[k] = sum(len(f) for f in frames)
    size = case.base.size
    return [
        Row(case.name, c.name, 100 * stored[k] / size, size / enc[k] / 1e9, size / dec[k] / 1e9)
        for k, c in enumerate(cands)
    ]


def give_up_cost(case: Case, chunk: int, repeat: int) -> tuple[bool, float]:
    """Whether ``delta.encode`` refused ``case`` and its time as a fraction of one
    BLAKE3 pass over the tensor (which the full path spends anyway)."""
    new, base = case.new.data, case.base.data
    took = hashing = float("inf")
    frames: list[bytes] | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        frames = delta.encode(new, base, chunk)
        took = min(took, time.perf_counter() - started)
        started = time.perf_counter()
        codec.digest(new)
        hashing = min(hashing, time.perf_counter() - started)
    return frames is None, took / hashing


def whole_tensor(case: Case, chunk: int, repeat: int) -> tuple[float, float]:
    """A tensor's delta as the publisher and an agent at its base run it, on every core
    (``hotswap.workers``): ``delta.encode`` with the base's chunk digests kept, and the
    frames decoded in the pool unhashed, then one BLAKE3 of the result (the agent's
    check against the manifest). GB/s both ways, best of ``repeat``."""
    new, base = case.new.data, case.base.data
    spans = codec.chunk_spans(case.base.size, chunk)
    kept = [delta.chunk_digest(base[s:e]) for s, e in spans]
    out: Bytes = np.empty_like(case.new)
    view = out.data
    enc = dec = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        frames = delta.encode(new, base, chunk, itemsize=case.itemsize, max_fraction=1.0,
                              base_digests=kept)  # fmt: skip
        enc = min(enc, time.perf_counter() - started)
        assert frames is not None
        jobs = (
            functools.partial(delta.decode_frame, f, base[s:e], view[s:e], verify=False)
            for (s, e), f in zip(spans, frames, strict=True)
        )
        started = time.perf_counter()
        hashing = codec.ChunkDigest(view, chunk)
        for i, _done in enumerate(workers.ordered(jobs)):
            hashing.landed(i)
        if hashing.hexdigest() != codec.digest(new):
            raise AssertionError(f"whole-tensor decode did not round-trip {case.name}")
        dec = min(dec, time.perf_counter() - started)
    size = case.base.size
    return size / enc / 1e9, size / dec / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=16, help="tensor size in MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="frame (chunk) size in KiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="1 MiB, one run, the default keyframe policy only"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.repeat = 1, 1
    torch.set_num_threads(1)
    chunk = args.chunk_kib * 1024
    data = codec.as_bytes(torch.randint(0, 256, (16 * MiB,), dtype=torch.uint8))
    started = time.perf_counter()
    delta.chunk_digest(data)
    print(
        f"{args.mib} MiB tensors, {args.chunk_kib} KiB frames, one thread, best of "
        f"{args.repeat}; {os.cpu_count()} CPUs, zstd {zstandard.ZSTD_VERSION}, "
        f"torch {torch.__version__}; BLAKE3 on one thread "
        f"{len(data) / (time.perf_counter() - started) / 1e9:.2f} GB/s"
    )
    cands = candidates()
    print("| step | encoding | stored % of full | encode GB/s | decode GB/s |")
    print("|---|---|---:|---:|---:|")
    chosen: list[float] = []
    steps = cases(args.mib * MiB, args.seed)
    for case in steps:
        label = f"{case.name} ({case.changed:.2%} of elements differ)"
        for r in measure(case, cands, chunk, args.repeat):
            if r.candidate == _hotswap().name and case.name.startswith("bf16 RL"):
                chosen.append(r.stored_pct)
            print(
                f"| {label} | {r.candidate} | {r.stored_pct:.2f} | "
                f"{r.encode_gbs:.2f} | {r.decode_gbs:.2f} |",
                flush=True,
            )
    print(
        f"\nWhole tensors on every core ({workers.threads()} threads, hotswap.workers): "
        "`delta.encode` (base digests kept) / frames decoded unhashed + one BLAKE3 of the result"
    )
    print("| step | encode GB/s | decode GB/s |")
    print("|---|---:|---:|")
    for case in steps[:-2]:  # random new weights go as full blobs
        e, d = whole_tensor(case, chunk, args.repeat)
        print(f"| {case.name} | {e:.2f} | {d:.2f} |", flush=True)
    print(
        "\n`delta.encode` on each step: refused (a full blob instead) or not, and its time "
        "/ one BLAKE3 pass"
    )
    for case in steps:
        refused, cost = give_up_cost(case, chunk, args.repeat)
        print(f"| {case.name} | {'refused' if refused else 'delta'} | {cost:.3f} |")
    print_chains(chosen, grid=not args.quick)


if __name__ == "__main__":
    main()
