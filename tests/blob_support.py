"""Tensors, entries and key snapshots shared by the store and blob tests."""

from __future__ import annotations

import redis
import torch

from hotswap import codec, keys
from hotswap.manifest import TensorEntry

CHUNK = 8192


def entry_for(
    name: str, tensor: torch.Tensor, chunk: int = CHUNK
) -> tuple[TensorEntry, memoryview]:
    buf = codec.as_bytes(tensor)
    s = codec.stats(tensor)
    entry = TensorEntry(
        name,
        codec.dtype_name(tensor.dtype),
        tuple(tensor.shape),
        len(buf),
        codec.digest(buf),
        chunk,
        s.norm,
        s.max_abs,
    )
    return entry, buf


def big_tensor(seed: int = 0) -> torch.Tensor:
    # 10,000 float32 = 40,000 bytes = 5 chunks of 8 KiB (the last one short).
    g = torch.Generator().manual_seed(seed)
    return torch.randn(100, 100, generator=g)


def snapshot(client: redis.Redis, model: str = "m") -> dict[bytes, bytes | None]:
    """Every key of ``model`` with its serialized value."""
    found: dict[bytes, bytes | None] = {}
    for pattern in keys.namespace_pattern("hotswap", model):
        for k in client.scan_iter(match=pattern):
            found[k] = client.dump(k)
    return found
