"""Blob chunks from the replica of a real Sentinel deployment, and WAIT on its primary (issue 16).

A primary, its replica and three sentinels (``sentinel_support``). The agent is
``tests/replica_worker.py`` in a process of its own, named the deployment by a
``redis+sentinel://`` URL and reading blobs through Sentinel's replica client
(``slave_for``). The replica is made to lag with ``CLIENT PAUSE WRITE``.
Every check of the model is bit-exact against the published tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from replica_worker import applied, fingerprint, launch, tensors
from sentinel_support import SentinelSet

from hotswap import keys
from hotswap.errors import StoreUnavailable
from hotswap.settings import HotswapSettings
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

MODEL = "rs"
CHANGED = {"layer2.weight", "layer5.weight"}


@pytest.fixture(scope="module")
def deployment() -> Iterator[SentinelSet]:
    with SentinelSet() as sentinels:
        yield sentinels


def settings_for(sentinels: SentinelSet, **values: Any) -> HotswapSettings:
    return HotswapSettings(
        redis_url=sentinels.url(),
        chunk_bytes=4096,
        deltas=False,
        socket_timeout=3.0,
        _env_file=None,  # type: ignore[call-arg]
        **values,
    )


def gets(port: int) -> int:
    with redis.Redis(port=port) as c:
        stats: dict[str, Any] = c.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def test_sentinel_replica_reads_fall_back_and_wait_refuses_while_it_lags(
    deployment: SentinelSet,
) -> None:
    replica = deployment.replica()
    env = {
        "HOTSWAP_REDIS_URL": deployment.url(),
        "HOTSWAP_READ_FROM_REPLICAS": "true",
        "HOTSWAP_POLL_INTERVAL": "0.2",
        "HOTSWAP_SOCKET_TIMEOUT": "3",
    }
    waiting = settings_for(deployment, wait_replicas=1, wait_timeout_ms=300)
    try:
        with launch(MODEL, env) as agent, Publisher(MODEL, settings=waiting) as pub:
            before = gets(replica.port)
            v1 = pub.publish(tensors(1))
            found, counts = applied(agent, v1)
            assert found == fingerprint(tensors(1))
            # WAIT put v1's blobs on the replica first: it served every chunk.
            assert counts["chunks"] > 0 and counts["fallbacks"] == 0
            assert gets(replica.port) - before >= counts["chunks"]

            with redis.Redis(port=replica.port) as c:
                c.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
            with Publisher(MODEL, settings=settings_for(deployment)) as quick:
                v2 = quick.publish(tensors(2, CHANGED, base=1))
                m = quick.store.manifest(v2)
            new = [
                k
                for e in m.tensors
                if e.name in CHANGED
                for k in keys.chunk_keys("hotswap", MODEL, e.digest, e.chunk_bytes, e.chunks)
            ]
            found, after = applied(agent, v2)
            assert found == fingerprint(tensors(2, CHANGED, base=1))
            assert (after["chunks"], after["fallbacks"]) == (counts["chunks"], len(new))

            with pytest.raises(StoreUnavailable) as caught:
                pub.publish(tensors(3))
            assert "the primary: 0 of 1; nothing changed" in str(caught.value)
            assert pub.store.head() == v2
    finally:
        with redis.Redis(port=replica.port) as c:
            c.execute_command("CLIENT", "UNPAUSE")
