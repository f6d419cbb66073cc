"""A canary rollout rides through a Redis Sentinel failover (issue 17).

The serving processes (``rollout_worker.py``) name the deployment by its
``redis+sentinel://`` URL; ``hotswap rollout`` by ``HOTSWAP_SENTINELS`` and
``HOTSWAP_SENTINEL_MASTER`` only. The primary is failed over
(``SENTINEL FAILOVER``) while the canary bakes. The defined outcomes: the
rollout rides through and promotes (exit 0), or it gives up on Redis with
exit 3 and a rerun of the same command resumes it from its record and
promotes. Either way the whole fleet ends on the version, bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rollout_support import (
    Pool,
    digests,
    hotswap_rollout,
    started_rollout,
    state,
    versions,
)
from sentinel_support import SERVICE, SentinelSet
from waiting import poll

from hotswap.rollouts import RolloutIO
from hotswap.settings import HotswapSettings
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

MODEL = "ha-rollout"


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    with SentinelSet() as topology:
        yield topology


def settings_for(url: str) -> HotswapSettings:
    return HotswapSettings(
        redis_url=url,
        chunk_bytes=64 * 1024,
        poll_interval=0.5,
        retry_attempts=4,
        retry_max_wait=0.5,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
    )


def test_a_rollout_rides_through_a_sentinel_failover(sentinel_set: SentinelSet) -> None:
    url = sentinel_set.url()
    env = {"HOTSWAP_SENTINELS": sentinel_set.addresses(), "HOTSWAP_SENTINEL_MASTER": SERVICE}
    names = [("c1", "canary"), ("s1", "stable"), ("s2", "stable")]
    pool = Pool(len(names))
    pub = Publisher(MODEL, settings=settings_for(url))
    try:
        workers = pool.serve(url, *names, heartbeat_ttl=15.0, model=MODEL)
        c1, *others = workers
        v1 = pub.publish(state(1))
        for w in workers:
            w.until(v1)
        v2 = pub.publish(state(2), promote=False)
        args = (str(v2), "--canary", "1", "--bake", "8s", "--apply-timeout", "30s")
        rollout = started_rollout(env, *args, "--lease", "10s", model=MODEL)
        try:
            c1.until(v2)
            io = RolloutIO(pub.store)
            assert poll(
                lambda: (r := io.read()) is not None and r.baking_since is not None,
                attempts=1000,
            ), "the canary step never baked"
            heir = sentinel_set.replica()
            sentinel_set.sentinel_failover()
            assert sentinel_set.poll_until_primary(heir), "the replica never took over"
            out, err = rollout.communicate(timeout=120)
        finally:
            if rollout.poll() is None:
                rollout.kill()
                rollout.wait(10)
        first = rollout.returncode
        print(f"rollout through the failover: exit {first}\n{out}\n{err}")
        if first == 3:
            # Redis unreachable for longer than the retries: a rerun resumes it.
            again = hotswap_rollout(env, *args, model=MODEL)
            print(f"rerun: exit {again.returncode}\n{again.stdout}\n{again.stderr}")
            assert again.returncode == 0, again.stdout + again.stderr
            assert f"resuming the rollout of v{v2}" in again.stdout
        else:
            assert first == 0, out + err
            assert f"model {MODEL}: v{v2} promoted" in out
        assert pub.store.head() == v2
        record = io.read()
        assert record is not None and record.state == "promoted"
        for w in workers:
            reply = w.until(v2, timeout=30)
            assert reply["digests"] == digests(state(2)) and reply["pinned"] is None
        for w in others:
            # Stable agents ran v2 only once it was head.
            assert versions(w("state")["history"], "applied") == [v1, v2]
    finally:
        pool.close()
        pub.close()
