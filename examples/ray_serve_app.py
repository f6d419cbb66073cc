"""Ray Serve deployments whose replicas each keep their model at head with a hotswap agent.

    pip install 'hotswap[ray]'          # ray[serve]
    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python examples/ray_serve_app.py --model-name mlp

Two applications, one per way Ray Serve runs a request handler:

POST /async/ {"features": [16 floats]}  AsyncMLP: an ``async def`` route; requests
                                        interleave on the replica's event loop, each
                                        holding the model with ``agent.reading_async()``
POST /sync/  {"features": [16 floats]}  SyncMLP: a ``def`` route, run in a worker thread,
                                        holding the model with ``agent.reading()``
GET  /async/readyz, GET /sync/readyz    readiness of the replica that answers (or 503)

Every answer carries ``X-Model-Version`` and the replica's pid. Each replica is
a process with its own model and agent, built in the constructor. The
constructor waits (up to ``READY_WAIT_SECONDS``) until the agent caught up with
head, because Ray routes requests to a replica as soon as its constructor has
returned; ``check_health`` fails only once the agent stopped (Ray then replaces
the replica: a version the agent refused must not); ``__del__`` stops the agent
when Ray shuts the replica down. Redis settings come from the ``HOTSWAP_*``
variables of the process that deploys, passed to the replicas.
"""

# No ``from __future__ import annotations``: Ray ships these classes to the replicas by
# value, where FastAPI could not resolve the routes' annotations written as strings.
import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from hotswap import Agent, HotswapSettings, readiness

WIDTH = 16
VERSION_HEADER = "X-Model-Version"
READY_WAIT_SECONDS = 30.0
log = logging.getLogger("ray_serve_app")


def build_model(seed: int = 0) -> torch.nn.Module:
    """The served model: in your deployment, the one you load from a checkpoint."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()


class Features(BaseModel):
    features: list[float] = Field(min_length=WIDTH, max_length=WIDTH)


class Replica:
    """What both deployments share: the model, its agent, readiness, the answer."""

    def __init__(self, model_name: str) -> None:
        self.model = build_model()
        self.agent = Agent(self.model, model_name, settings=HotswapSettings()).start()
        deadline = time.monotonic() + READY_WAIT_SECONDS
        while not (check := readiness(self.agent)).ready and time.monotonic() < deadline:
            time.sleep(0.05)
        if not check.ready:
            log.warning("replica serves before it is ready: %s", check.reason)

    def check_health(self) -> None:
        """Ray's health check: only a stopped agent is a reason to replace the replica."""
        check = readiness(self.agent)
        if not check.alive:
            raise RuntimeError(f"hotswap agent of this replica: {check.reason}")

    def __del__(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            agent.stop()

    def answer(self, body: Features, response: Response) -> dict[str, Any]:
        """Call inside the agent's read: the version read here is the one that answers."""
        version = self.agent.applied_version
        with torch.inference_mode():
            logits = self.model(torch.tensor([body.features]))[0].tolist()
        response.headers[VERSION_HEADER] = str(version)
        return {"version": version, "logits": logits, "pid": os.getpid()}

    def probe(self) -> JSONResponse:
        check = readiness(self.agent)
        body = {**check.as_dict(), "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if check.ready else 503)


async_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(async_api)
class AsyncMLP(Replica):
    @async_api.post("/")
    async def predict(self, body: Features, response: Response) -> dict[str, Any]:
        async with self.agent.reading_async():  # this request's own read, on the loop
            return self.answer(body, response)

    @async_api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        return self.probe()


sync_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(sync_api)
class SyncMLP(Replica):
    # FastAPI runs a ``def`` route in a worker thread: the blocking read is fine there.
    @sync_api.post("/")
    def predict(self, body: Features, response: Response) -> dict[str, Any]:
        with self.agent.reading():
            return self.answer(body, response)

    @sync_api.get("/readyz")
    def readyz(self) -> JSONResponse:
        return self.probe()


def deploy(model_name: str, replicas: int) -> None:
    """Run both applications on the Serve instance already started."""
    serve.run(
        AsyncMLP.options(num_replicas=replicas).bind(model_name),
        name="async",
        route_prefix="/async",
    )
    serve.run(
        SyncMLP.options(num_replicas=replicas).bind(model_name),
        name="sync",
        route_prefix="/sync",
    )


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description="Ray Serve deployments with hotswap agents.")
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=2, help="replicas per deployment")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ray_serve_app: %(message)s", stream=sys.stderr)
    hotswap_env = {k: v for k, v in os.environ.items() if k.startswith("HOTSWAP_")}
    ray.init(
        address="local",
        include_dashboard=False,
        runtime_env={"env_vars": hotswap_env},
        _node_ip_address="127.0.0.1",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deploy(args.model_name, args.replicas)
        print(f"listening on http://127.0.0.1:{args.port}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()  # replicas end, and their __del__ stops each agent
    finally:
        ray.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
