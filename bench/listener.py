"""A bare subscriber in its own process: when each notice reached a client.

Run by the benchmark as ``python -m bench.listener URL PATTERN``; prints one
JSON line per message (channel, payload hex, ``time.monotonic()``). Kept free
of torch and of any other thread, so that its clock readings are not delayed
by another thread holding the GIL.
"""

from __future__ import annotations

import json
import sys
import time

import redis


def main() -> None:
    url, pattern = sys.argv[1], sys.argv[2]
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(pattern)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        msg = pubsub.get_message(timeout=1.0)
        if msg is None:
            continue
        t = time.monotonic()
        channel = msg["channel"].decode()
        print(
            json.dumps({"channel": channel, "data": bytes(msg["data"]).hex(), "t": t}), flush=True
        )


if __name__ == "__main__":
    main()
