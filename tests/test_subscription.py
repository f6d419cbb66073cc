"""The notice channel's choices: plain pub/sub on one server, what counts as a
refusal of shard channels, and the commit's announcement on one server.

The cluster side (SSUBSCRIBE, failover, fallbacks) runs on a real cluster in
tests/ha/test_sharded_notices.py.
"""

from __future__ import annotations

import redis
import torch

from hotswap import keys
from hotswap.connection import TRANSIENT
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.subscription import (
    BROADCAST,
    ChannelMoved,
    _refused_shard_channels,
    notice_mode,
)
from publisher import Publisher


def test_one_server_announces_by_broadcast() -> None:
    assert notice_mode(redis.Redis(port=1)) == BROADCAST  # no connection is made


def test_a_moved_channel_is_a_transient_connection_error() -> None:
    assert issubclass(ChannelMoved, redis.ConnectionError)
    assert isinstance(ChannelMoved("slot moved"), TRANSIENT)


def test_what_counts_as_a_refusal_of_shard_channels() -> None:
    # Redis 6 answers SSUBSCRIBE with an unknown-command error; an ACL user without
    # the right, with NOPERM. Anything else is not a reason to fall back.
    assert _refused_shard_channels(
        redis.ResponseError("unknown command 'SSUBSCRIBE', with args beginning with: 'x' ")
    )
    assert _refused_shard_channels(
        redis.exceptions.NoPermissionError("this user has no permissions to run 'ssubscribe'")
    )
    assert not _refused_shard_channels(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert not _refused_shard_channels(redis.exceptions.MovedError("3999 127.0.0.1:6381"))


def test_a_commit_on_one_server_publishes_on_the_plain_channel(
    client: redis.Redis, settings: HotswapSettings
) -> None:
    store = Store(client, "m")
    sub = store.subscribe()
    try:
        assert not sub.sharded and sub.node is None
        with Publisher("m", settings=settings) as pub:
            assert pub.publish({"w": torch.zeros(4)}) == 1
        assert sub.get(timeout=10.0) is not None
    finally:
        sub.close()
    stats = client.info("commandstats")
    assert "cmdstat_publish" in stats and "cmdstat_spublish" not in stats
    assert keys.events_channel("hotswap", "m") == "hotswap:{m}:events"
