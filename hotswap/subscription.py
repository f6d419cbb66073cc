"""A model's notice channel (Redis pub/sub): wait for one raw notice at a time.

``Store.subscribe`` opens one; the agent's delivery loop reads it. Decoding a
notice is ``hotswap.notice``'s job, not this module's. On a Redis Cluster a
failed subscribe or read makes the client learn the slot map again, so that
the next subscription goes to the channel's new owner after a failover.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import redis

from hotswap.connection import TRANSIENT, RedisClient
from hotswap.transport import refresh_topology

# The store's guarded call: ``call(what, fn)`` retries and maps Redis errors.
Guarded = Callable[[str, Callable[[], Any]], Any]


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
        # Each attempt opens a pub/sub of its own: a cluster client's pub/sub
        # stays bound to the node it first chose, which may be the dead one.
        self._pubsub = call("subscribing", self._open)

    def _open(self) -> Any:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._channel)
        except TRANSIENT:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
            refresh_topology(self._client)
            raise
        return pubsub

    def get(self, timeout: float) -> bytes | None:
        """One notice's bytes, or None after ``timeout``; raises redis errors unwrapped
        so the agent can tell a dropped connection from silence."""
        deadline = time.monotonic() + timeout
        while True:
            # get_message returns None at once for a (un)subscribe confirmation,
            # so keep waiting until a real message or the deadline.
            try:
                message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            except TRANSIENT:
                refresh_topology(self._client)  # its node may be gone: learn who took over
                raise
            if message is not None and message.get("type") == "message":
                data = message["data"]
                return data if isinstance(data, bytes) else str(data).encode()
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        # Closing a dead connection is not an error.
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
