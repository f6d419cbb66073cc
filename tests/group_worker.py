"""One rank of a tensor-parallel toy for the group-apply tests (issue 19).

    python tests/group_worker.py REDIS_URL INIT_FILE RANK WORLD [SLOW_RANK]

Each rank holds a slice of three published ``Linear`` layers (``l0`` split by
output rows, ``l1`` by input columns, ``l2`` by output rows; ``l1.bias`` whole)
and its agent takes only that slice (``shards=``), so a NaN outside a rank's
slice is none of its business. A forward pass sums ``l1``'s partial products
with ``all_reduce`` and joins ``l2``'s rows with ``all_gather``. Every rank
fails a probe on a slice holding a value of 100 or more; SLOW_RANK validates
slowly. Commands come from
stdin, one JSON line each; every reply is one JSON line:

    {"cmd": "pending", "version": 3}  wait until version 3 is pending here
    {"cmd": "refused", "version": 3}  wait until this rank refused version 3
    {"cmd": "step"}                   apply_pending(group=pg), then a forward pass
    {"cmd": "revert"}                 revert(group=pg), then a forward pass
    {"cmd": "fail"}                   make this rank's reads of manifests fail from now on
    {"cmd": "heal"}                   ... and work again
    {"cmd": "stop"}                   stop this rank's agent (its thread ends)
    {"cmd": "state"}                  just the reply: what runs, waits, was refused
    {"cmd": "quit"}
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
import torch
import torch.distributed as dist

from hotswap.agent import Agent
from hotswap.errors import HotswapError
from hotswap.settings import HotswapSettings
from hotswap.slices import ShardSpec

HIDDEN = 8
# Published tensor -> (dimension it is split along, or None: every rank holds it whole).
SPLIT = {
    "l0.weight": 0,
    "l0.bias": 0,
    "l1.weight": 1,
    "l1.bias": None,
    "l2.weight": 0,
    "l2.bias": 0,
}
# Collectives of the group give up after this long: a killed rank ends in an error.
GROUP_TIMEOUT = datetime.timedelta(seconds=3)


def full(seed: float) -> dict[str, torch.Tensor]:
    """The published model of version ``seed``: small distinct values per tensor."""
    g = torch.Generator().manual_seed(int(seed * 1000))
    shapes: dict[str, tuple[int, ...]] = {f"l{i}.weight": (HIDDEN, HIDDEN) for i in range(3)}
    shapes |= {f"l{i}.bias": (HIDDEN,) for i in range(3)}
    return {k: torch.randn(*s, generator=g) for k, s in sorted(shapes.items())}


def part(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of published tensor ``name``."""
    dim = SPLIT[name]
    return t if dim is None else t.chunk(world, dim)[rank]


def inputs() -> torch.Tensor:
    return torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(7))


def reference(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The single-process forward pass over the whole published weights."""
    h = torch.relu(inputs() @ weights["l0.weight"].T + weights["l0.bias"])
    y = h @ weights["l1.weight"].T + weights["l1.bias"]
    return y @ weights["l2.weight"].T + weights["l2.bias"]


def forward(live: Mapping[str, torch.Tensor], world: int) -> torch.Tensor:
    """The tensor-parallel forward pass: this rank's rows of l0, its columns of l1."""
    h = torch.relu(inputs() @ live["l0.weight"].T + live["l0.bias"])
    y = h @ live["l1.weight"].T
    dist.all_reduce(y)
    y = y + live["l1.bias"]
    z = y @ live["l2.weight"].T + live["l2.bias"]
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z)
    return torch.cat(parts, dim=1)


def slowly(name: str, new: torch.Tensor, old: torch.Tensor) -> str | None:
    """A rank slow to validate (the slow-rank test)."""
    time.sleep(0.3)
    return None


def main() -> int:
    url, init, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    slow = len(sys.argv) > 5 and int(sys.argv[5]) == rank
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=GROUP_TIMEOUT
    )
    settings = HotswapSettings(
        redis_url=url,
        poll_interval=0.3,
        retry_attempts=2,
        retry_max_wait=0.2,
        socket_timeout=2.0,
        connect_timeout=0.5,
        heartbeat_ttl=3,
        agent_nice=0,
        _env_file=None,  # type: ignore[call-arg]
    )
    base = full(0)
    live = {k: part(k, t, rank, world).clone() for k, t in base.items()}

    def probe(model: Mapping[str, torch.Tensor]) -> str | None:
        top = max(float(t.abs().max()) for t in model.values())
        return None if top < 100 else f"a weight of {top:g} on rank {rank}"

    failing = threading.Event()

    def factory(client: Any, model: str, s: HotswapSettings, retrying: Any) -> Any:
        from hotswap.store import Store

        store = Store.from_settings(client, model, s, retrying)
        manifest_bytes = store.manifest_bytes

        def guarded(version: int) -> bytes:
            if failing.is_set():
                raise redis.ConnectionError("this rank's Redis reads fail (test)")
            return manifest_bytes(version)

        store.manifest_bytes = guarded  # type: ignore[method-assign]
        return store

    shards = {
        "l0.*": ShardSpec(rank, world, 0),
        "l1.weight": ShardSpec(rank, world, 1),
        "l2.*": ShardSpec(rank, world, 0),
    }
    agent = Agent(
        live,
        "m",
        settings=settings,
        mode="manual",
        shards=shards,
        policy={"validators": [slowly] if slow else [], "norm_ratio": None},
        probes=[probe],
        name=f"rank{rank}",
        store_factory=factory,
    ).start()
    print(json.dumps({"ready": agent.agent_id}), flush=True)
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        reply: dict[str, Any] = {}
        try:
            if request["cmd"] == "pending":
                version, state = int(request["version"]), agent._pipeline.state
                reply["ok"] = state.wait_until(
                    lambda: any(p[1] == version for p in state.pending()),
                    float(request.get("timeout", 20)),
                )
            elif request["cmd"] == "refused":
                version, state = int(request["version"]), agent._pipeline.state
                reply["ok"] = state.wait_until(
                    lambda: state.rejection(version) is not None,
                    float(request.get("timeout", 20)),
                )
            elif request["cmd"] == "step":
                reply["applied"] = agent.apply_pending(group=dist.group.WORLD)
            elif request["cmd"] == "revert":
                reply["back"] = agent.revert(group=dist.group.WORLD)
            elif request["cmd"] == "state":
                pass
            elif request["cmd"] == "fail":
                failing.set()
            elif request["cmd"] == "heal":
                failing.clear()
            elif request["cmd"] == "stop":
                agent.stop()
            elif request["cmd"] == "quit":
                break
        except HotswapError as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        if request["cmd"] in ("step", "revert") and "error" not in reply:
            reply["out"] = forward(live, world).tolist()
        status = agent.reporter.status
        reply.update(
            version=agent.applied_version,
            pending=[p[1] for p in agent._pipeline.state.pending()],
            rejection=status.rejection,
            last_error=status.last_error,
            rejected=status.rejected_versions,
        )
        print(json.dumps(reply), flush=True)
    agent.stop()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
