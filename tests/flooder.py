"""A notice flooder for the flood tests: one client PUBLISHing garbage as fast as it can.

Usage: python flooder.py REDIS_URL CHANNEL CAP

Sends pipelined batches of one-byte garbage notices to CHANNEL, prints
``FLOODING`` once the first batches are out, and exits after CAP notices
(or when killed). Its own process: its CPU is not the agent's.
"""

from __future__ import annotations

import sys

import redis

BATCH = 1000
GARBAGE = b"\xc1"  # never valid msgpack


def main() -> None:
    url, channel, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    sent = 0
    while sent < cap:
        for _ in range(BATCH):
            pipe.publish(channel, GARBAGE)
        pipe.execute()
        sent += BATCH
        if sent == 10 * BATCH:
            print("FLOODING", flush=True)


if __name__ == "__main__":
    main()
