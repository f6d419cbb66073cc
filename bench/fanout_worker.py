"""One of the fan-out benchmark's N serving processes (``python -m bench.fanout_worker``).

Holds a live copy of the model with a real ``Agent`` applying into it, and a
shadow copy that the bare-GET ceiling fetches into. ``sharing`` switches the
agent, between two versions, to reading through a host cache folder that all
the workers share (``hotswap.sharedblobs``, as ``HOTSWAP_HOST_CACHE_DIR``
sets up) and back. Speaks the JSON lines of
``bench.procs.serve``; times are ``time.monotonic()``, comparable across
processes on one machine.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import baselines, model
from bench.procs import serve
from hotswap import HotswapSettings
from hotswap.blobs import BlobStore
from hotswap.connection import connect
from hotswap.hostcache import HostCache
from hotswap.replicas import ReplicaReads
from hotswap.sharedblobs import SharedBlobStore


class FanoutWorker:
    def __init__(self) -> None:
        self._out = threading.Lock()
        self.live: dict[str, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self.client: Any = None
        self.chunks: baselines.ChunkIO | None = None
        self.agent: Any = None
        self._plain: BlobStore | None = None
        self._shared: SharedBlobStore | None = None
        self.replicas: ReplicaReads | None = None

    def emit(self, message: dict[str, Any]) -> None:
        with self._out:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def init(self, settings: dict[str, Any], size: int, dtype: str, seed: int) -> int:
        self.live = model.build(size, getattr(torch, dtype), seed)
        self.shadow = {k: v.clone() for k, v in self.live.items()}
        # The ceiling's client is the agent's kind (plain or cluster), so that
        # both read every chunk from the node that owns it.
        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]
        self.client = connect(config)
        self.chunks = baselines.chunk_io(self.client)  # the default window, as agents
        # Where the agents read replicas, so does the ceiling (hotswap's own replica client).
        self.replicas = ReplicaReads.of(self.client, config)
        return len(self.live)

    def arm(self, names: list[str], chunk: int, prefix: str, channel: str) -> None:
        """Wait (in a thread) for one message on ``channel``, then GET ``names``' chunks
        into the shadow copy, as a bare client would."""
        chunks = self.chunks
        assert chunks is not None
        pubsub = self.client.pubsub()
        pubsub.subscribe(channel)
        # Subscribed before the reply: a message published after it is heard.
        while (confirm := pubsub.get_message(timeout=10)) is None or confirm["type"] != "subscribe":
            pass

        def run() -> None:
            try:
                while pubsub.get_message(timeout=60) is None:
                    pass
                keys, views = baselines.chunked(self.shadow, names, chunk, prefix)
                got = self._get_all(chunks, keys, views)
                self.emit({"event": "fetched", "t_done": time.monotonic(), "bytes": got})
            except Exception as e:
                self.emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
            finally:
                pubsub.close()

        threading.Thread(target=run, daemon=True).start()

    def _get_all(self, chunks: baselines.ChunkIO, keys: list[str], views: list[memoryview]) -> int:
        """GET ``keys`` into ``views`` (from replicas first where they are read); bytes got."""
        if self.replicas is None:
            return sum(n or 0 for n in chunks.get_into(keys, views))
        lengths = self.replicas._get_into(keys, views, lambda j, n: None)
        # A chunk a replica lacks (there should be none after the WAIT) from its master.
        missing = [j for j, n in enumerate(lengths) if n is None]
        again = chunks.get_into([keys[j] for j in missing], [views[j] for j in missing])
        return sum(n or 0 for n in lengths) + sum(n or 0 for n in again)

    def agent_start(self, model_name: str, settings: dict[str, Any]) -> None:
        from hotswap import Agent

        config = HotswapSettings(**settings, _env_file=None)  # type: ignore[call-arg]

        def applied(version: int, report: Any) -> None:
            self.emit(
                {
                    "event": "applied",
                    "version": version,
                    "t_done": time.monotonic(),
                    "bytes": report.bytes_fetched,
                }
            )

        def rejected(version: int, reasons: dict[str, list[str]]) -> None:
            self.emit({"event": "error", "error": f"v{version} rejected: {reasons}"})

        self.agent = Agent(
            self.live, model_name, settings=config, on_applied=applied, on_rejected=rejected
        )
        self.agent.start()

    def sharing(self, folder: str | None, budget: int) -> None:
        """Read blobs through the host cache at ``folder`` from the next version on
        (None: straight from Redis). Called between versions, while the agent waits."""
        if self._plain is None:
            self._plain = self.agent.store.blobs
        if folder is None:
            self.agent.store.blobs = self._plain
            return
        if self._shared is None:
            assert self._plain is not None
            self._shared = SharedBlobStore.around(self._plain, HostCache(folder, budget))
        self.agent.store.blobs = self._shared

    def agent_stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def finish(self) -> None:
        self.agent_stop()
        if self.replicas is not None:
            self.replicas.close()
        if self.client is not None:
            self.client.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    worker = FanoutWorker()
    commands: dict[str, Callable[..., Any]] = {
        "init": worker.init,
        "arm": worker.arm,
        "agent_start": worker.agent_start,
        "sharing": worker.sharing,
        "agent_stop": worker.agent_stop,
    }
    serve(commands, worker.emit, worker.finish)


if __name__ == "__main__":
    main()
