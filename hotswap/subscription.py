"""A model's notice channel (Redis pub/sub): wait for one raw notice at a time.

``Store.subscribe`` opens one; the agent's delivery loop reads it. Decoding a
notice is ``hotswap.notice``'s job, not this module's.

On one server the channel is a plain one (``SUBSCRIBE``; the commit script
``PUBLISH``-es). On a Redis Cluster it is a shard channel (Redis 7's
``SSUBSCRIBE``; the commit script ``SPUBLISH``-es): a notice then travels
only to the shard that owns the model's slot, not to every node. The agent
listens on the owner's master, and there also with a plain ``SUBSCRIBE`` so
that a publisher from before shard channels (which broadcasts) still wakes
it. When the slot moves (failover, resharding) the node drops the shard
subscription, or the client's slot map names another owner: ``get`` raises
``ChannelMoved`` and the delivery loop subscribes again, at the new owner.
Redis < 7, or a Redis user without ``+ssubscribe``, falls back to plain
pub/sub (logged once). A failed subscribe or read makes the client learn the
slot map again, so that the next subscription goes to the right node.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
import redis.cluster

from hotswap.connection import TRANSIENT, RedisClient
from hotswap.transport import refresh_topology

log = logging.getLogger("hotswap.agent")

# The store's guarded call: ``call(what, fn)`` retries and maps Redis errors.
Guarded = Callable[[str, Callable[[], Any]], Any]

# How the commit script announces a version (its ARGV): on a shard channel
# (falling back to PUBLISH where Redis refuses SPUBLISH), or broadcast.
SHARDED = "sharded"
BROADCAST = "broadcast"
# Longest wait for the server to confirm a subscription when no socket
# timeout is configured on the node's connection.
CONFIRM_SECONDS = 5.0
# Replies a (s)subscribe can carry and what each is.
_DATA = ("message", "smessage")
_DROPPED = ("sunsubscribe", "unsubscribe")

# Cluster clients whose servers cannot take shard channels (Redis < 7, or a
# user without the right): their subscriptions are plain, and are not tried
# as shard channels again.
_broadcast_only: weakref.WeakSet[Any] = weakref.WeakSet()


class ChannelMoved(redis.ConnectionError):
    """The channel's shard has a new owner (failover, resharding): subscribe again.

    A ``redis.ConnectionError``: every caller that handles a dropped
    subscription (retry, fall back to polling, subscribe again) handles this.
    """


def notice_mode(client: RedisClient) -> str:
    """How a commit on ``client`` announces a version: ``SHARDED`` on a Redis Cluster
    (one shard hears it), ``BROADCAST`` on one server.

    Example::

        notice_mode(redis.Redis())  # 'broadcast'
    """
    return SHARDED if isinstance(client, redis.cluster.RedisCluster) else BROADCAST


def _refused_shard_channels(error: redis.ResponseError) -> bool:
    """Whether ``error`` answered SSUBSCRIBE because this server has no shard
    channels (before Redis 7) or this user may not use them."""
    text = str(error).lower()
    return isinstance(error, redis.exceptions.NoPermissionError) or "unknown command" in text


class Subscription:
    """The model's notice channel; ``get`` waits for one raw notice or returns None.

    Args:
        client: the Redis client to subscribe with.
        channel: the channel's name (``keys.events_channel``).
        call: runs the subscribe under the store's retry and error policy.

    Raises:
        StoreUnavailable: Redis could not be reached to subscribe.

    Example::

        sub = store.subscribe()
        try:
            raw = sub.get(timeout=1.0)  # bytes of one notice, or None
        finally:
            sub.close()
    """

    def __init__(self, client: RedisClient, channel: str, call: Guarded) -> None:
        self._client = client
        self._channel = channel
        # The cluster node a shard subscription listens on (None: plain pub/sub).
        self.node: str | None = None
        # Notices that arrived while a subscription was being confirmed.
        self._early: collections.deque[bytes] = collections.deque()
        # Each attempt opens a pub/sub of its own: a cluster client's pub/sub
        # stays bound to the node it first chose, which may be the dead one.
        self._pubsub = call("subscribing", self._open)

    @property
    def sharded(self) -> bool:
        """Whether this subscription listens on a shard channel (Redis Cluster, Redis 7+)."""
        return self.node is not None

    def _open(self) -> Any:
        cluster = isinstance(self._client, redis.cluster.RedisCluster)
        if cluster and self._client not in _broadcast_only:
            pubsub = self._open_sharded()
            if pubsub is not None:
                return pubsub
        return self._open_plain()

    def _open_plain(self) -> Any:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._channel)
        except TRANSIENT:
            _close(pubsub)
            refresh_topology(self._client)
            raise
        return pubsub

    def _open_sharded(self) -> Any | None:
        """A pub/sub on the master owning the channel's slot, subscribed to the shard
        channel and the plain one; None where shard channels are refused."""
        try:
            node = self._client.get_node_from_key(self._channel)
        except redis.exceptions.RedisClusterException as e:
            # The slot has no owner in the client's map (mid-failover): learn it again.
            refresh_topology(self._client)
            raise ChannelMoved(f"no node serves the channel's slot yet: {e}") from e
        pubsub = self._client.get_redis_connection(node).pubsub()
        try:
            pubsub.ssubscribe(self._channel)
            pubsub.subscribe(self._channel)
            self._confirm(pubsub, {"ssubscribe", "subscribe"})
        except TRANSIENT:  # ClusterDownError and TryAgainError are ResponseErrors too
            _close(pubsub)
            refresh_topology(self._client)
            raise
        except (redis.exceptions.MovedError, redis.exceptions.AskError) as e:
            _close(pubsub)
            refresh_topology(self._client)
            raise ChannelMoved(f"node {node.name} no longer serves the channel: {e}") from e
        except redis.ResponseError as e:
            _close(pubsub)
            if not _refused_shard_channels(e):
                raise
            _broadcast_only.add(self._client)
            log.warning(
                "Redis refused SSUBSCRIBE on %s (%s): listening on the plain channel, which "
                "hears a notice only where the publisher broadcasts it (Redis < 7, or a user "
                "without +spublish); otherwise new versions arrive by polling. Use Redis 7 or "
                "later and grant +ssubscribe (README, Security), then restart the agent",
                node.name,
                e,
            )
            return None
        self.node = node.name
        return pubsub

    def _confirm(self, pubsub: Any, wanted: set[str]) -> None:
        """Read the server's confirmations of ``wanted``; a notice met first is kept."""
        timeout = pubsub.connection_pool.connection_kwargs.get("socket_timeout")
        deadline = time.monotonic() + (timeout or CONFIRM_SECONDS)
        left = set(wanted)
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise redis.TimeoutError(f"no confirmation of {sorted(left)} from Redis")
            message = pubsub.get_message(timeout=remaining)
            if message is None:
                continue
            kind = message.get("type")
            if kind in _DATA:
                self._early.append(_data(message))
            left.discard(kind)

    def get(self, timeout: float) -> bytes | None:
        """One notice's bytes, or None after ``timeout``; raises redis errors unwrapped
        so the agent can tell a dropped connection from silence.

        Raises:
            ChannelMoved: the shard channel's slot moved to another node.
        """
        if self._early:
            return self._early.popleft()
        deadline = time.monotonic() + timeout
        while True:
            self._check_owner()
            # get_message returns None at once for a (un)subscribe confirmation,
            # so keep waiting until a real message or the deadline.
            try:
                message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            except TRANSIENT:
                refresh_topology(self._client)  # its node may be gone: learn who took over
                raise
            kind = None if message is None else message.get("type")
            if message is not None and kind in _DATA:
                return _data(message)
            if kind in _DROPPED and self.sharded:
                # Unasked: the node gave the slot away and dropped its shard channels.
                refresh_topology(self._client)
                raise ChannelMoved(f"node {self.node} dropped the channel (its slot moved)")
            if time.monotonic() >= deadline:
                return None

    def _check_owner(self) -> None:
        """Raise ``ChannelMoved`` if the client's slot map, refreshed since this
        subscription began (a command met the failover), names another owner: a
        frozen or dead master says nothing, and a reply elsewhere learned why."""
        if self.node is None:
            return
        try:
            owner = self._client.get_node_from_key(self._channel)
        except redis.exceptions.RedisClusterException:
            return  # the slot is being handed over: the next check will know
        if owner is not None and owner.name != self.node:
            raise ChannelMoved(f"the channel's slot moved from {self.node} to {owner.name}")

    def close(self) -> None:
        _close(self._pubsub)


def _data(message: dict[str, Any]) -> bytes:
    data = message["data"]
    return data if isinstance(data, bytes) else str(data).encode()


def _close(pubsub: Any) -> None:
    # Closing a dead connection is not an error.
    with contextlib.suppress(redis.RedisError, OSError):
        pubsub.close()
