"""What the delta benchmark reads from Redis: bytes on the wire and bytes held.

Bytes on the wire are Redis ``INFO stats`` counters (``total_net_input_bytes``,
``total_net_output_bytes``): every byte of every client, protocol included,
so they cross-check the reports' payload counts. Bytes held by one model
are measured two ways over its keys (``keys.namespace_pattern``): the
values of its blob chunks added up (``STRLEN``: the stored data) and
``MEMORY USAGE`` of every key of the model (manifests, index, log and
agents' records included, with Redis's per-key overhead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from hotswap import keys
from hotswap.manifest import Manifest

BATCH = 1000


@dataclass
class Sample:
    """One publish-and-apply of one approach; times in seconds, sizes in bytes."""

    case: str
    approach: str  # delta, full (hotswap with deltas=False), naive, ceiling
    version: int
    changed: float  # fraction of elements whose bytes changed in this step
    size: int  # the model's size
    publish: float
    end_to_end: float  # publish start to the agent's applied callback
    uploaded: int  # the publisher's report (naive, ceiling: what the worker read)
    fetched: int  # the agent's report
    net_in: int  # INFO stats, all clients, over the publish and apply
    net_out: int
    publisher_peak: int = 0
    agent_peak: int = 0
    base_held: int = 0
    tensors_delta: int = 0
    keyframes: int = 0
    gc: float = 0.0  # seconds of the gc after the publish (not in end_to_end)
    step: int = 0  # samples of one step share it (paired comparisons)
    # The agent's ApplyReport: fetch (with decoding and hashing), validation, the
    # writer-lock pause; and the publisher's delta bytes and where its bases came from.
    fetch: float = 0.0
    validate: float = 0.0
    pause: float = 0.0
    bytes_delta: int = 0
    bases: dict[str, int] = field(default_factory=dict)
    # CPU seconds, every thread: the publishing process over the publish, the
    # serving process from arming to applied, the Redis server over both.
    publisher_cpu: float = 0.0
    agent_cpu: float = 0.0
    redis_cpu: float = 0.0


def chain_depth(m: Manifest | None) -> int:
    """The longest chain of deltas a fresh agent of this version may decode (a keyframe
    entry has its full blob: no chain)."""
    if m is None:
        return 0
    depths = [e.delta.depth for e in m.tensors if e.delta is not None and not e.delta.keyframe]
    return max(depths, default=0)


class RedisMeter:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.ns = namespace

    def net(self) -> tuple[int, int]:
        stats: dict[str, Any] = self.client.info("stats")
        return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])

    def cpu(self) -> float:
        """The server's CPU seconds so far (user and system, every thread)."""
        info: dict[str, Any] = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def net_since(self, before: tuple[int, int]) -> tuple[int, int]:
        now = self.net()
        return now[0] - before[0], now[1] - before[1]

    def _keys(self, pattern: str) -> list[bytes]:
        return list(self.client.scan_iter(match=pattern, count=BATCH))

    def delete(self, pattern: str) -> None:
        found = self._keys(pattern)
        for i in range(0, len(found), BATCH):
            self.client.delete(*found[i : i + BATCH])

    def held(self, model: str, size: int) -> dict[str, float]:
        """What ``model`` holds in Redis, as multiples of ``size`` (the model's bytes)."""
        meta, blobs = keys.namespace_pattern(self.ns, model)
        blob_keys = self._keys(blobs)
        all_keys = blob_keys + self._keys(meta)
        stored = usage = 0
        for i in range(0, len(all_keys), BATCH):
            batch = all_keys[i : i + BATCH]
            pipe = self.client.pipeline(transaction=False)
            for k in batch:
                pipe.memory_usage(k, samples=0)
            for k in batch[: max(0, len(blob_keys) - i)]:
                pipe.strlen(k)
            got = [int(n or 0) for n in pipe.execute()]
            usage += sum(got[: len(batch)])
            stored += sum(got[len(batch) :])
        return {"stored": stored / size, "usage": usage / size, "keys": len(all_keys)}
