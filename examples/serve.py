"""A small HTTP inference server with an embedded hotswap agent.

    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python examples/serve.py --model-name tiny

POST /predict {"tokens": [1, 2, 3]} -> the top tokens and a fingerprint of the output
GET  /version                       -> the version this process runs
GET  /healthz                       -> agent state and lag behind head

Each forward pass runs inside ``agent.reading()``, so an update is applied
between requests, never during one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from hotswap.agent import Agent

from hotswap import HotswapSettings
from publisher.demo_model import build

MAX_TOKENS = 512


def make_handler(model: torch.nn.Module, agent: Agent) -> type[BaseHTTPRequestHandler]:
    vocab = model.embed.num_embeddings  # type: ignore[union-attr]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            if self.path == "/version":
                self._send(200, {"version": agent.applied_version})
            elif self.path == "/healthz":
                head = getattr(agent, "head_version", None)
                applied = agent.applied_version
                lag = None if head is None or applied is None else max(0, head - applied)
                ok = agent.state not in ("stopped",)
                self._send(
                    200 if ok else 503,
                    {
                        "state": agent.state,
                        "version": applied,
                        "head": head,
                        "lag": lag,
                    },
                )
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/predict":
                self._send(404, {"error": f"no route {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                tokens = json.loads(self.rfile.read(length) or b"{}").get("tokens", [1, 2, 3])
                if not (
                    isinstance(tokens, list)
                    and 0 < len(tokens) <= MAX_TOKENS
                    and all(isinstance(t, int) and 0 <= t < vocab for t in tokens)
                ):
                    raise ValueError(f"tokens must be 1-{MAX_TOKENS} ints in [0, {vocab})")
            except (ValueError, json.JSONDecodeError) as e:
                self._send(400, {"error": str(e)})
                return
            batch = torch.tensor([tokens])
            with agent.reading(), torch.inference_mode():
                version = agent.applied_version
                logits = model(batch)[0, -1]
            top = torch.topk(logits, 5).indices.tolist()
            digest = hashlib.blake2b(logits.numpy().tobytes(), digest_size=8).hexdigest()
            self._send(200, {"version": version, "top": top, "fingerprint": digest})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0, help="initial weights before any update")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s", stream=sys.stderr)

    model = build(args.seed)
    agent = Agent(model, args.model_name, settings=HotswapSettings())
    agent.start()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model, agent))
    server.daemon_threads = True

    def shut_down(signum: int, frame: object) -> None:
        # shutdown() blocks until serve_forever returns, so it can't run on that thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
