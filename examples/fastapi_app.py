"""A FastAPI app that serves a model kept at the head version by an embedded hotswap agent.

    pip install 'hotswap[metrics]' fastapi uvicorn
    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python examples/fastapi_app.py --model-name mlp
    # or: uvicorn --factory examples.fastapi_app:create_app

POST /predict {"features": [16 floats]} -> {"version", "logits"}, header X-Model-Version
GET  /healthz  liveness: 200 while the agent runs (Redis away included), 503 once it stopped
GET  /readyz   readiness: 200 once the model runs head (or refused head and runs an
               earlier version), else 503 with the reason
GET  /metrics  Prometheus: hotswap's gauges and counters (docs/metrics.md)

The agent reports the app's health to ``hotswap rollout`` (``Agent(health=...)``):
the /predict requests of the last ``WINDOW`` seconds, their error rate (answers
of 500 and over) and their p99 latency in ms, e.g. ``hotswap rollout mlp 7
--max error_rate=0.01 --max p99_ms=50``. ``HOTSWAP_AGENT_NAME=web-1`` gives
the agent a stable id (host-web-1), so a restarted canary is still one, and
``HOTSWAP_TRACK=canary`` makes this process a canary.

Async-safe: each request holds the model with ``async with agent.reading_async()``
(the read belongs to the request's task, never blocks the event loop, and no
update lands while it is held), and the forward pass runs in a worker thread
so that probes and other requests are answered meanwhile. The agent starts
and stops with the app (lifespan). Run one worker per process: each worker is
a process with its own agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import prometheus_client
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from hotswap import Agent, HotswapSettings, readiness

WIDTH = 16
VERSION_HEADER = "X-Model-Version"
# Seconds of requests the health numbers cover: recent enough to show a bad version
# within a rollout's bake, long enough to hold a p99.
WINDOW = 60.0
T = TypeVar("T")


class Window:
    """The /predict requests of the last ``seconds``: when, how long, whether they failed.

    Example::

        window = Window(60.0)
        window.add(0.012, failed=False)
        window.health()  # {'requests': 1.0, 'error_rate': 0.0, 'p99_ms': 12.0}
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()  # requests add, the agent's health thread reads
        self._seen: deque[tuple[float, float, bool]] = deque()

    def add(self, took: float, failed: bool) -> None:
        with self._lock:
            self._seen.append((time.monotonic(), took, failed))

    def health(self) -> dict[str, float]:
        """Requests in the window, their error rate and p99 latency (ms); none: just 0."""
        with self._lock:
            while self._seen and self._seen[0][0] < time.monotonic() - self.seconds:
                self._seen.popleft()
            seen = list(self._seen)
        if not seen:
            return {"requests": 0.0}
        took = sorted(t for _, t, _ in seen)
        p99 = took[min(len(took) - 1, int(0.99 * len(took)))]
        errors = sum(1 for *_, failed in seen if failed)
        return {"requests": float(len(seen)), "error_rate": errors / len(seen), "p99_ms": p99 * 1e3}


def build_model(seed: int = 0) -> torch.nn.Module:
    """The served model: in your app, the one you load from a checkpoint."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()


class Features(BaseModel):
    features: list[float] = Field(min_length=WIDTH, max_length=WIDTH)


def create_app(model_name: str = "mlp", settings: HotswapSettings | None = None) -> FastAPI:
    """The app: the model, its agent (started by the lifespan) and the routes."""
    model = build_model()
    window = Window(WINDOW)
    # Build the agent once the model is where it will run (``.to(device)`` first).
    agent = Agent(model, model_name, settings=settings or HotswapSettings(), health=window.health)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with agent:  # start() before the first request, stop() after the last
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.agent = agent

    @app.middleware("http")
    async def timed(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path != "/predict":
            return await call_next(request)
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            window.add(time.perf_counter() - start, failed=True)
            raise
        window.add(time.perf_counter() - start, failed=response.status_code >= 500)
        return response

    @app.post("/predict")
    async def predict(body: Features, response: Response) -> dict[str, object]:
        x = torch.tensor([body.features])
        async with agent.reading_async():  # one version for the whole request
            # Read inside the hold: the number of the weights that answer.
            version = agent.applied_version
            logits = await in_thread(forward, model, x)
        response.headers[VERSION_HEADER] = str(version)
        return {"version": version, "logits": logits}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        check = readiness(agent)
        return JSONResponse(check.as_dict(), status_code=200 if check.alive else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        check = readiness(agent)
        return JSONResponse(check.as_dict(), status_code=200 if check.ready else 503)

    # A route rather than ``app.mount("/metrics", make_asgi_app())``: a mount
    # answers "/metrics" with a redirect to "/metrics/".
    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
        )

    return app


def forward(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    with torch.inference_mode():
        out: list[float] = model(x)[0].tolist()
    return out


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread. If the request is cancelled meanwhile (the
    client went away), wait for the thread before the read is released: an update
    must never land under a forward pass that still runs."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FastAPI server with a hotswap agent.")
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fastapi_app: %(message)s", stream=sys.stderr)
    # Bound here so that a port of 0 can be printed before serving starts.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    print(f"listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(create_app(args.model_name), log_level="warning")
    # uvicorn stops on SIGTERM or SIGINT: requests in flight finish, then the lifespan
    # stops the agent.
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
