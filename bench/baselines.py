"""The two references hotswap is measured against.

Raw ceiling: the lean transport with no hashing, checks or staging: tensor
memory goes out with sendmsg and comes back with recv_into straight into the
destination tensors, one window of GETs in flight across all chunks.

Naive: what one writes by hand: per tensor ``torch.save`` to a buffer and
``SET``; ``GET``, ``torch.load(weights_only=True)`` and ``copy_``.

The ceiling runs on hotswap's own chunk transport (``hotswap.transport``),
which is not public API: this is the one bench module that imports it, so a
change there is followed here only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import torch

from hotswap import codec
from hotswap.transport import DEFAULT_WINDOW, BlobTransport, ChunkIO

__all__ = [
    "DEFAULT_WINDOW",
    "BlobTransport",
    "ChunkIO",
    "ceiling_apply",
    "ceiling_publish",
    "chunk_keys",
    "chunk_io",
    "chunked",
    "naive_apply",
    "naive_publish",
    "raw_transport",
]


def raw_transport(client: redis.Redis, window: int = DEFAULT_WINDOW) -> BlobTransport:
    """hotswap's chunk transport over ``client``'s pool, with ``window`` GETs in flight."""
    transport = BlobTransport.for_client(client, window=window)
    if transport is None:
        raise TypeError(f"the raw ceiling needs a plain redis.Redis client, not {client!r}")
    return transport


def chunk_io(client: Any) -> ChunkIO:
    """The same transport over a plain or a cluster client (each key to its node)."""
    chunks = ChunkIO.of(client)
    if chunks is None:
        raise TypeError(f"the raw ceiling needs a redis.Redis or RedisCluster, not {client!r}")
    return chunks


def chunk_keys(prefix: str, name: str, nbytes: int, chunk: int) -> list[str]:
    return [f"{prefix}:{name}:{i}" for i in range(codec.chunk_count(nbytes, chunk))]


def chunked(
    sd: Mapping[str, torch.Tensor], names: Sequence[str], chunk: int, prefix: str
) -> tuple[list[str], list[memoryview]]:
    """The chunk keys of ``names`` under ``prefix`` and views of their bytes, in order."""
    keys: list[str] = []
    views: list[memoryview] = []
    for name in names:
        data = codec.as_bytes(sd[name])
        keys += chunk_keys(prefix, name, len(data), chunk)
        views += [data[a:b] for a, b in codec.chunk_spans(len(data), chunk)]
    return keys, views


def ceiling_publish(
    client: redis.Redis,
    transport: BlobTransport,
    sd: Mapping[str, torch.Tensor],
    names: Sequence[str],
    chunk: int,
    prefix: str,
    channel: str,
    notice: bytes,
) -> None:
    keys, views = chunked(sd, names, chunk, prefix)
    transport.set_chunks(keys, views)
    client.publish(channel, notice)


def ceiling_apply(
    transport: BlobTransport,
    dst: Mapping[str, torch.Tensor],
    names: Sequence[str],
    chunk: int,
    prefix: str,
) -> int:
    """Fetch straight into ``dst``'s memory; returns the bytes received."""
    keys, views = chunked(dst, names, chunk, prefix)
    lengths = transport.get_into(keys, views)
    return sum(n or 0 for n in lengths)


def naive_publish(
    client: redis.Redis,
    sd: Mapping[str, torch.Tensor],
    names: Sequence[str],
    prefix: str,
    channel: str,
    notice: bytes,
) -> None:
    for name in names:
        buf = io.BytesIO()
        torch.save(sd[name], buf)
        client.set(f"{prefix}:{name}", buf.getbuffer())
    client.publish(channel, notice)


def naive_apply(
    client: redis.Redis, dst: Mapping[str, torch.Tensor], names: Sequence[str], prefix: str
) -> int:
    got = 0
    with torch.no_grad():
        for name in names:
            raw = client.get(f"{prefix}:{name}")
            if not isinstance(raw, bytes):
                raise KeyError(f"naive baseline: {prefix}:{name} is missing")
            got += len(raw)
            dst[name].copy_(torch.load(io.BytesIO(raw), weights_only=True))
    return got
