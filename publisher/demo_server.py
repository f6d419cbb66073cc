"""A small HTTP inference server with an embedded hotswap agent.

    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python -m publisher.demo_server --model-name tiny

The server of ``hotswap demo`` and of examples/serve.py (which runs this
module): it ships inside the package so that an installed ``hotswap demo``
runs without a checkout of the repository.

POST /predict {"tokens": [1, 2, 3]} -> top tokens, the version that answered, a fingerprint
GET  /version                       -> the version this process runs, what its apply cost
GET  /applied                       -> every version this process applied, in order
GET  /healthz                       -> liveness: agent state and lag behind head (503 once stopped)
GET  /readyz                        -> readiness: 200 once the model runs head (or refused head
                                       and runs an earlier version), else 503 with the reason

Each forward pass runs inside ``agent.reading()``, so an update is applied
between requests, never during one. SIGTERM or SIGINT stops accepting
requests, lets the ones in flight finish, then stops the agent.

``--max-drift 0.1`` adds a post-apply probe (``OutputsInBounds``): a fixed
batch whose logits may move at most that fraction from those of the last
version the probe passed. HOTSWAP_TRACK=canary makes the process a canary of
``hotswap rollout``; HOTSWAP_AGENT_NAME gives its agent a stable id.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from hotswap import (
    Agent,
    ApplyReport,
    HotswapError,
    HotswapSettings,
    Store,
    connect,
    operation_retry,
    readiness,
)
from publisher.demo_model import TinyTransformer, build

MAX_TOKENS = 512
MAX_BODY = 64 * 1024
HEAD_CACHE_SECONDS = 1.0

# The probe's fixed batch: the same prompts in every process and at every start.
PROBE_BATCH = (8, 16)
PROBE_SEED = 7

log = logging.getLogger("serve")


class OutputsInBounds:
    """A post-apply probe: the fixed batch's logits may move at most ``max_drift`` (relative
    L2 change) from those of the last version it passed; the first version it sees passes
    (nothing ran before it to compare with).

    Example::

        Agent(model, "tiny", probes=[OutputsInBounds(vocab=2000, max_drift=0.1)])
    """

    def __init__(self, vocab: int, max_drift: float) -> None:
        self.__name__ = "outputs_in_bounds"  # how the agent names the probe in reasons
        self.max_drift = max_drift
        generator = torch.Generator().manual_seed(PROBE_SEED)
        self.batch = torch.randint(0, vocab, PROBE_BATCH, generator=generator)
        self.reference: torch.Tensor | None = None

    def __call__(self, model: TinyTransformer) -> str | None:
        logits = model(self.batch)
        if self.reference is not None:
            drift = float((logits - self.reference).norm() / self.reference.norm())
            if drift > self.max_drift:
                # The reference stays: the version that serves after the revert is its own.
                return (
                    f"logits on the fixed batch moved {drift:.0%} from the last good "
                    f"version's (at most {self.max_drift:.0%})"
                )
        self.reference = logits
        return None


class HeadWatch:
    """The model's head version for /healthz, read at most once a second.

    A health probe must answer fast even while Redis is away (the model keeps
    serving then), so this client tries once with short timeouts.
    """

    def __init__(self, model_name: str, settings: HotswapSettings) -> None:
        quick = settings.model_copy(update={"socket_timeout": 1.0, "connect_timeout": 1.0})
        self._client = connect(quick)
        self._store = Store(
            self._client, model_name, namespace=settings.namespace, retrying=operation_retry(1)
        )
        self._lock = threading.Lock()
        self._at = 0.0
        self._head: int | None = None
        self._error: str | None = None

    def head(self) -> tuple[int | None, str | None]:
        """(head version, error reading it); cached for HEAD_CACHE_SECONDS."""
        with self._lock:
            if time.monotonic() - self._at > HEAD_CACHE_SECONDS:
                try:
                    self._head, self._error = self._store.head(), None
                except HotswapError as e:
                    self._error = str(e)
                self._at = time.monotonic()
            return self._head, self._error

    def close(self) -> None:
        self._client.close()


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the model, its agent and the head watch."""

    daemon_threads = True  # idle keep-alive connections must not hold up shutdown

    def __init__(
        self,
        address: tuple[str, int],
        model: TinyTransformer,
        agent: Agent,
        head: HeadWatch,
    ) -> None:
        super().__init__(address, Handler)
        self.model = model
        self.agent = agent
        self.head_watch = head
        # What the last applied version cost, for /version (set by the agent's callback).
        self.last_apply: dict[str, Any] = {}
        # Every version this process applied, in order: a version it never ran is absent.
        self.applied: list[int] = []
        self._inflight = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Counts a request being answered (not an idle keep-alive connection)."""
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the demo's narration

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        with self.server.busy():
            self._get()

    def do_POST(self) -> None:
        with self.server.busy():
            self._post()

    def _get(self) -> None:
        agent = self.server.agent
        if self.path == "/version":
            self._send(
                200, {"version": agent.applied_version, "last_apply": self.server.last_apply}
            )
        elif self.path == "/applied":
            self._send(200, {"applied": list(self.server.applied)})
        elif self.path == "/healthz":
            head, error = self.server.head_watch.head()
            applied = agent.applied_version
            lag = None if head is None else head - (applied or 0)
            state = agent.state
            body: dict[str, Any] = {
                "state": state,
                "version": applied,
                "head": head,
                "lag": lag,
                "redis_error": error,
            }
            rejection = agent.last_rejection
            if rejection is not None:
                body["last_rejection"] = str(rejection)
            # Serving old weights while Redis is away is healthy; a dead agent is not.
            self._send(503 if state == "stopped" else 200, body)
        elif self.path == "/readyz":
            check = readiness(agent)
            self._send(200 if check.ready else 503, check.as_dict())
        else:
            self._send(404, {"error": f"no route GET {self.path}"})

    def _post(self) -> None:
        if self.path != "/predict":
            self._send(404, {"error": f"no route POST {self.path}"})
            return
        model, agent = self.server.model, self.server.agent
        vocab = model.embed.num_embeddings
        try:
            tokens = self._tokens(vocab)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
        with agent.reading(), torch.inference_mode():
            version = agent.applied_version
            logits = model(torch.tensor([tokens]))[0, -1]
        top = torch.topk(logits, 5).indices.tolist()
        # The fingerprint lets a client see that two answers came from the same bytes.
        fingerprint = hashlib.blake2b(logits.numpy().tobytes(), digest_size=8).hexdigest()
        self._send(200, {"version": version, "top": top, "fingerprint": fingerprint})

    def _tokens(self, vocab: int) -> list[int]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError as e:
            raise ValueError("Content-Length is not a number") from e
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"body must be 1 to {MAX_BODY} bytes of JSON")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"body is not JSON: {e}") from e
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not (
            isinstance(tokens, list)
            and 0 < len(tokens) <= MAX_TOKENS
            and all(type(t) is int and 0 <= t < vocab for t in tokens)
        ):
            raise ValueError(f'expected {{"tokens": [1 to {MAX_TOKENS} ints in [0, {vocab})]}}')
        return tokens


def make_server(
    model_name: str,
    settings: HotswapSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int = 0,
    *,
    max_drift: float | None = None,
) -> Server:
    """Build the model, start its agent and bind the HTTP server (not yet serving).

    ``max_drift`` adds the ``OutputsInBounds`` probe with that bound.
    """
    model = build(seed)
    servers: list[Server] = []

    def applied(version: int, report: ApplyReport) -> None:
        # One assignment, so a request never reads half of a report.
        servers[0].last_apply = {
            "version": version,
            "tensors_changed": report.tensors_changed,
            "bytes_fetched": report.bytes_fetched,
            "fetch_seconds": report.fetch_seconds,
            "validate_seconds": report.validate_seconds,
            "apply_seconds": report.apply_seconds,
        }
        servers[0].applied.append(version)

    probes = [] if max_drift is None else [OutputsInBounds(model.embed.num_embeddings, max_drift)]
    agent = Agent(model, model_name, settings=settings, on_applied=applied, probes=probes)
    servers.append(Server((host, port), model, agent, HeadWatch(model_name, settings)))
    agent.start()
    return servers[0]


def close_server(server: Server, grace: float = 10.0) -> None:
    """Close the socket, let requests in flight finish, then stop the agent."""
    server.server_close()
    if not server.wait_idle(grace):
        log.warning("requests still running after %.0fs; stopping anyway", grace)
    server.agent.stop()
    server.head_watch.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP inference server with a hotswap agent.")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="initial weights before any update")
    parser.add_argument(
        "--max-drift",
        type=float,
        default=None,
        metavar="FRACTION",
        help="probe each version: the fixed batch's logits may move at most this much "
        "(relative L2) from the last good version's, else it is reverted and refused",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s", stream=sys.stderr)

    try:
        server = make_server(
            args.model_name,
            HotswapSettings(),
            args.host,
            args.port,
            args.seed,
            max_drift=args.max_drift,
        )
    except (HotswapError, OSError) as e:
        print(f"serve: cannot start: {e}", file=sys.stderr)
        return 1

    def shut_down(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it can't run on that thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        close_server(server)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
