"""A model's notice channel (Redis pub/sub): wait for one raw notice at a time.

``Store.subscribe`` opens one; the agent's delivery loop reads it. Decoding a
notice is ``hotswap.notice``'s job, not this module's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import redis

from hotswap.connection import RedisClient

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
        self._channel = channel
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        call("subscribing", lambda: self._pubsub.subscribe(self._channel))

    def get(self, timeout: float) -> bytes | None:
        """One notice's bytes, or None after ``timeout``; raises redis errors unwrapped
        so the agent can tell a dropped connection from silence."""
        deadline = time.monotonic() + timeout
        while True:
            # get_message returns None at once for a (un)subscribe confirmation,
            # so keep waiting until a real message or the deadline.
            message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message.get("type") == "message":
                data = message["data"]
                return data if isinstance(data, bytes) else str(data).encode()
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        # Closing a dead connection is not an error.
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
