"""Freshness: agents converge on head's *content*, and signed heads cannot be replayed.

Issue 13, defects 1 and 2, against the Update Framework's attacks (rollback,
indefinite freeze, mix-and-match) and key revocation. A version number says
nothing about content once Redis was restored from an older snapshot, and a
signature says who wrote a manifest, not how new it is: agents compare the
BLAKE3 digest of manifests, and with signing keys follow only a signed head
record (``hotswap.headrecord``) no older than the newest they accepted.
"""

from __future__ import annotations

import pytest
from agent_support import until
from rel_support import (
    MODEL,
    admin_store,
    agent_status,
    assert_runs_exactly,
    digests,
    live_copy,
    make_state,
    nudged,
    settings_for,
)

from hotswap import codec
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from publisher import views
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability


def test_agent_converges_on_content_after_redis_is_restored_from_an_older_snapshot() -> None:
    """Defect 1: v3 applied, Redis restored to a snapshot at v2, new content published
    as v3 again: the agent applies the new v3 (it used to keep the old one, report
    v3 with lag 0, while a fresh agent ran other bytes as v3)."""
    with EmbeddedRedis() as server:
        cfg = settings_for(server)
        store = admin_store(server)
        base = make_state(1)
        live = live_copy(make_state(0))
        with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
            pub.publish(base)
            assert pub.publish(nudged(base, 0.01)) == 2
            store.client.save()  # the snapshot: head v2
            assert pub.publish(nudged(base, 0.02)) == 3
            assert agent.wait_for(3, 10)
            old_v3 = codec.digest(store.manifest_bytes(3))
            server.restart()  # loads the snapshot: head v2, same lineage
            assert store.head() == 2
            fresh_content = nudged(base, 0.03)
            assert pub.publish(fresh_content) == 3  # v3 again, other bytes
            new_v3 = codec.digest(store.manifest_bytes(3))
            assert new_v3 != old_v3
            assert until(agent, lambda: digests(live) == digests(fresh_content), 15)
            assert_runs_exactly(store, live, 3)
            assert until(agent, lambda: agent.manifest_digest == new_v3)
            assert until(
                agent,
                lambda: (
                    getattr(agent_status(store, agent.agent_id), "manifest_digest", None) == new_v3
                ),
            )
            (row,) = views.status_view(store)["agents"]
            assert (row["version"], row["lag"], row["diverged"]) == (3, 0, False)
            # A freshly started agent runs the same bytes as v3.
            other = live_copy(make_state(0))
            with Agent(other, MODEL, settings=cfg) as late:
                assert late.wait_for(3, 10)
                assert digests(other) == digests(live)
                assert late.manifest_digest == new_v3
