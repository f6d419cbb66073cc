"""Three serving processes of one model on one host share a fetch (HOTSWAP_HOST_CACHE_DIR).

Real processes (tests/hostcache_agent_worker.py: an agent configured from
the environment), a real redis-server: every process applies v2 bit-exactly,
and Redis sent v2's changed bytes once, not three times (INFO stats
total_net_output_bytes over the update).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
import torch
from hostcache_agent_worker import SHAPES
from waiting import poll
from worker_proc import worker

from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

WORKER = Path(__file__).with_name("hostcache_agent_worker.py")
MODEL = "hosted"
AGENTS = 3


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def net_output(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


@pytest.mark.parametrize("sharing", [True, False], ids=["shared", "not shared"])
def test_agents_of_one_host_fetch_a_version_from_redis_once(
    client: redis.Redis,
    settings: HotswapSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sharing: bool,
) -> None:
    folder = tmp_path / "shm"
    # The workers' environment; "not shared" shows what the measure tells apart.
    monkeypatch.setenv("HOTSWAP_HOST_CACHE_DIR", str(folder) if sharing else "")
    pub = Publisher(MODEL, settings=settings)
    with ExitStack() as stack:
        workers = [
            stack.enter_context(worker(WORKER, settings.redis_url, MODEL, 2, Store(client, MODEL)))
            for _ in range(AGENTS)
        ]
        assert pub.publish(random_state(1)) == 1
        assert poll(lambda: all(w.runs(1) for w in workers)), "v1 not applied everywhere"
        before = net_output(client)
        assert pub.publish(random_state(2)) == 2
        assert poll(lambda: all(w.runs(2) for w in workers)), "v2 not applied everywhere"
        served = net_output(client) - before
        pub.close()
        got = [w.result() for w in workers]
    final = Store(client, MODEL).manifest(2).by_name()
    changed = sum(e.nbytes for e in final.values())  # random bytes: every tensor new
    print(f"sharing {sharing}: Redis sent {served} bytes for {changed} changed")
    if sharing:
        # Once, plus small replies (polls of head, the notice, status writes).
        assert changed <= served < 1.5 * changed, (served, changed)
        files = {p.name for p in folder.iterdir()}
        assert {f"b-{e.digest}-{e.nbytes}" for e in final.values()} <= files
    else:
        assert served >= AGENTS * changed, (served, changed)
        assert not folder.exists()
    for result in got:
        assert result["reached_last"] is True
        assert result["digests"] == {name: e.digest for name, e in final.items()}


@pytest.fixture(autouse=True)
def _flushed(client: object) -> None:
    """The `client` fixture empties Redis before the run."""
