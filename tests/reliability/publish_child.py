"""A publisher process for the kill -9 test: announces its first upload, then waits.

Usage: python publish_child.py REDIS_URL MODEL SEED TENSORS WIDTH

After its first tensor's chunks are in Redis it prints ``UPLOADING <bytes> <total>``
and blocks inside the progress callback, so the parent can SIGKILL it with the
rest of the upload unsent and nothing committed.
"""

from __future__ import annotations

import sys
import time

from rel_support import make_state, settings_for

from publisher.publisher import Publisher


def main() -> None:
    url, model, seed, tensors, width = sys.argv[1:6]
    state = make_state(int(seed), int(tensors), int(width))

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "upload":
            print(f"UPLOADING {done} {total}", flush=True)
            time.sleep(120)  # killed here

    with Publisher(model, settings=settings_for(url)) as pub:
        pub.publish(state, progress=progress)
    print("COMMITTED", flush=True)


if __name__ == "__main__":
    main()
