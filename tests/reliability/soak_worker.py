"""The serving process of the soak test: one Agent, reader threads, agent restarts.

Usage: python soak_worker.py REDIS_URL MODEL TENSORS WIDTH READERS

Tensor j of version k holds k * (j + 1) everywhere, so one read of every
tensor names the version it saw; a read whose tensors disagree (or a tensor
that is not uniform) is a mixed read. Prints ``applied N`` per version; reads commands
on stdin: ``rss LABEL`` (report resident memory), ``restart LABEL`` (replace the
agent by a new one), ``stop`` (print a final JSON line of counts and exit).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import psutil
import torch
from rel_support import settings_for

from hotswap.agent import Agent, ApplyReport


def main() -> None:
    url, model, tensors, width, readers = sys.argv[1:6]
    live = {f"t{j}": torch.zeros(int(width), int(width)) for j in range(int(tensors))}
    cfg = settings_for(url, poll_interval=1.0)
    lock = threading.Lock()
    printed = threading.Lock()
    counts = {"reads": 0, "mixed": 0, "restarts": 0}
    seen_versions: set[int] = set()
    stop = threading.Event()
    passes = [0] * int(readers)

    def say(line: str) -> None:
        with printed:
            print(line, flush=True)

    def on_applied(version: int, report: ApplyReport) -> None:
        say(f"applied {version}")

    holder = [Agent(live, model, settings=cfg, on_applied=on_applied)]

    def read_forever(me: int) -> None:
        while not stop.is_set():
            agent = holder[0]
            with agent.reading():
                if holder[0] is not agent:
                    continue  # swapped for a restarted agent: read under the new one's lock
                seen = set()
                uniform = True
                for j, t in enumerate(live.values()):
                    lo, hi = torch.aminmax(t)
                    uniform &= bool(lo == hi)
                    seen.add(float(lo) / (j + 1))
            with lock:
                counts["reads"] += 1
                if len(seen) != 1 or not uniform:
                    counts["mixed"] += 1
                else:
                    seen_versions.add(int(seen.pop()))
            passes[me] += 1
            time.sleep(0.002)  # between requests: leave the GIL to the agent

    threads = [
        threading.Thread(target=read_forever, args=(i,), daemon=True) for i in range(len(passes))
    ]
    for t in threads:
        t.start()
    holder[0].start()
    say("ready")
    process = psutil.Process()
    rss_at: dict[str, int] = {}
    restarted_at: set[int] = set()
    while True:
        command = sys.stdin.readline().split() or ["stop"]
        if command[0] == "rss":
            rss_at[command[1]] = process.memory_info().rss
            say(f"rss {command[1]} {rss_at[command[1]]}")
        elif command[0] == "restart":
            old = holder[0]
            old.stop()
            new = Agent(live, model, settings=cfg, on_applied=on_applied)
            holder[0] = new
            # Every reader passes twice more: none still reads under the old agent's
            # lock when the new agent may first write.
            marks = list(passes)
            while any(p < m + 2 for p, m in zip(passes, marks, strict=True)):
                time.sleep(0.001)
            new.start()
            restarted_at.add(int(command[1]))
            counts["restarts"] += 1
            say(f"restarted {command[1]}")
        elif command[0] == "stop":
            break
    stop.set()
    for t in threads:
        t.join(10)
    holder[0].stop()
    final = {name: float(t[0, 0]) / (j + 1) for j, (name, t) in enumerate(live.items())}
    say(
        json.dumps(
            {
                **counts,
                "distinct_versions_read": len(seen_versions),
                "final": sorted(set(final.values())),
                "rss": rss_at,
            }
        )
    )


if __name__ == "__main__":
    main()
