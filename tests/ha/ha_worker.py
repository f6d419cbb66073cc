"""A serving process on a Redis Cluster for the failover tests (run as its own process).

Serves the probe model of ``serving_worker`` (every tensor of version ``k``
holds ``BASE + k``) in reader threads under ``agent.reading()``, so a pass
that saw two versions is caught. Prints one line per event, each with
``time.monotonic()`` (one clock for every process of the host):

    READY <agent id>
    APPLIED <version> <monotonic>
    STATE <state> <monotonic>          (each change of the agent's state)

and, once stdin closes, one JSON line with what the readers saw.

    python tests/ha/ha_worker.py 'redis://a:7000,b:7001' MODEL
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from serving_worker import READERS, WIDTH, Probe, decode

from hotswap import codec
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings

_SAY = threading.Lock()


def say(*words: object) -> None:
    """One whole line per event: threads print them, and must not interleave."""
    line = " ".join(map(str, words)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("model")
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--heartbeat-ttl", type=float, default=15.0)
    parser.add_argument("--socket-timeout", type=float, default=10.0)
    # A primary under Sentinel (a redis+sentinel:// URL) is no cluster.
    parser.add_argument("--no-cluster", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Probe()
    settings = HotswapSettings(
        redis_url=args.redis_url,
        cluster=not args.no_cluster,
        poll_interval=args.poll,
        heartbeat_ttl=args.heartbeat_ttl,
        socket_timeout=args.socket_timeout,
        _env_file=None,  # type: ignore[call-arg]
    )
    agent = Agent(
        model,
        args.model,
        settings=settings,
        on_applied=lambda v, r: say("APPLIED", v, time.monotonic()),
    )
    stop = threading.Event()
    lock = threading.Lock()
    mixed: list[object] = []
    passes = [0]
    x = torch.ones(1, WIDTH)

    def serve() -> None:
        while not stop.is_set():
            with agent.reading(), torch.no_grad():
                number = agent.applied_version
                out = model(x)[0]
            versions = decode(out)
            with lock:
                passes[0] += 1
                # Every tensor at one version, whichever it is (a rollback
                # brings back an older content under a new number).
                if len(set(versions)) != 1:
                    mixed.append({"applied_version": number, "versions": versions})

    def watch_state() -> None:
        last = None
        while not stop.is_set():
            state = agent.state
            if state != last:
                say("STATE", state, time.monotonic())
                last = state
            stop.wait(0.05)

    agent.start()
    threads = [threading.Thread(target=serve) for _ in range(READERS)]
    threads.append(threading.Thread(target=watch_state))
    for t in threads:
        t.start()
    say("READY", agent.agent_id)
    sys.stdin.read()  # the test closes stdin to end the run
    stop.set()
    for t in threads:
        t.join()
    agent.stop()
    result = {
        "passes": passes[0],
        "mixed": mixed[:20],
        "mixed_count": len(mixed),
        "digests": {k: codec.digest(codec.as_bytes(t)) for k, t in model.state_dict().items()},
    }
    say(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
