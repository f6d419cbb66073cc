"""A subscription lost mid-session is taken again without ending the session (issue 16).

On a cluster this is the failover of the node serving the notice channel; on
one server ``CLIENT KILL TYPE pubsub`` drops just that connection while head
stays readable, which is the same case for the delivery loop.
"""

from __future__ import annotations

import logging

import pytest
import redis
from agent_support import MODEL, Ten, bump, commit_raw, equal_state, until, watched_agent
from waiting import poll

from hotswap import keys
from hotswap.settings import HotswapSettings
from hotswap.store import Store


def test_lost_subscription_is_taken_again_while_the_session_goes_on(
    settings: HotswapSettings,
    client: redis.Redis,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hotswap.agent")
    # A long poll interval: a version applied soon after comes by its notice.
    slow = settings.model_copy(update={"poll_interval": 30.0})
    channel = keys.events_channel(store.ns, MODEL)
    model = Ten()
    agent, _seen = watched_agent(model, slow)
    with agent:
        assert until(agent, lambda: agent.state == "idle")
        assert client.pubsub_numsub(channel) == [(channel.encode(), 1)]
        assert client.client_kill_filter(_type="pubsub") == 1
        # Subscribed again (the loop tries once a second at most), no reconnect.
        assert poll(lambda: client.pubsub_numsub(channel) == [(channel.encode(), 1)], 1000)
        new = bump(model.state_dict())
        v = commit_raw(store, new)
        assert agent.wait_for(v, 10)
        assert equal_state(model, new)
        assert agent.state == "idle"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the notice channel failed" in m for m in messages) == 1, messages
    assert not [m for m in messages if "Redis unreachable" in m], messages
