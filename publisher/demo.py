"""``hotswap demo``: the whole loop on a real server process, narrated.

Starts a Redis of its own (unless HOTSWAP_REDIS_URL is set, then it works
under a namespace of its own and deletes only its keys), launches
examples/serve.py with an embedded agent, publishes, breaks, and rolls back.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from hotswap.connection import connect
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import HotswapError
from hotswap.settings import HotswapSettings
from hotswap.status import decode as decode_status
from hotswap.store import Store
from publisher.demo_model import build
from publisher.publisher import Publisher

MODEL = "tiny"
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
PROMPT = [5, 17, 42, 7, 99]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


class _Server:
    """examples/serve.py in a child process, talking JSON over loopback HTTP."""

    def __init__(self, settings: HotswapSettings) -> None:
        if not SERVER_SCRIPT.exists():
            raise HotswapError(f"{SERVER_SCRIPT} not found: run the demo from a source checkout")
        env = {
            **os.environ,
            "HOTSWAP_REDIS_URL": settings.redis_url,
            "HOTSWAP_NAMESPACE": settings.namespace,
            "HOTSWAP_POLL_INTERVAL": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), "--model-name", MODEL, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise HotswapError(
                "the example server did not start (run examples/serve.py to see why)"
            )
        self.base = line.split()[-1]

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:  # noqa: S310 - loopback
            return dict(json.loads(r.read()))

    def predict(self) -> dict[str, Any]:
        req = urllib.request.Request(
            self.base + "/predict",
            data=json.dumps({"tokens": PROMPT}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return dict(json.loads(r.read()))

    def wait_version(self, version: int, timeout: float = 20.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.get("/version")["version"] == version:
                return time.monotonic() - start
            time.sleep(0.01)
        raise HotswapError(f"the server did not apply v{version} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


@contextlib.contextmanager
def _redis(settings: HotswapSettings | None) -> Iterator[tuple[HotswapSettings, bool]]:
    if settings is not None:
        ns = f"hotswap-demo-{secrets.token_hex(3)}"
        yield settings.model_copy(update={"namespace": ns}), False
        return
    with EmbeddedRedis() as server:
        yield HotswapSettings(redis_url=server.url, _env_file=None), True  # type: ignore[call-arg]


def _agent_report(store: Store) -> dict[str, Any]:
    records = [decode_status(raw) for _, raw, alive in store.agent_records() if alive]
    return vars(records[0]) if records else {}


def _wait_rejected(store: Store, version: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = _agent_report(store)
        if report.get("rejected_version") == version:
            return report
        time.sleep(0.02)
    raise HotswapError(f"the server did not report v{version} as rejected within {timeout:.0f}s")


def run_demo(settings: HotswapSettings | None, console: Console | None = None) -> int:
    """Run the narrated demo; returns the exit code."""
    out = console or Console()
    say = out.print
    started = time.monotonic()
    server: _Server | None = None
    try:
        with _redis(settings) as (cfg, embedded):
            where = (
                "an embedded redis-server"
                if embedded
                else f"{cfg.redis_url} (namespace {cfg.namespace})"
            )
            say(f"[bold]hotswap demo[/bold]: Redis is {where}")
            client = connect(cfg)
            store = Store(client, MODEL, namespace=cfg.namespace)
            pub = Publisher(MODEL, settings=cfg, connection=client)
            try:
                server = _Server(cfg)
                before = server.predict()
                say(
                    f"1. Started a serving process ({server.base}) with an embedded agent; "
                    f"it answers top tokens {before['top']} from its initial weights."
                )

                weights = build(seed=1).state_dict()
                v1 = pub.publish(weights, message="first trained weights")
                r = pub.last_report
                took = server.wait_version(v1)
                a1 = server.predict()
                say(
                    f"2. Published v{v1}: {r.tensors_changed} tensors, {_mb(r.bytes_uploaded)} "
                    f"uploaded in {r.seconds:.2f}s; the server applied it {took * 1000:.0f} ms later "
                    f"and now answers {a1['top']} (was {before['top']})."
                )

                layer = {k: v.clone() for k, v in weights.items()}
                for name in layer:
                    if name.startswith("blocks.1.mlp."):
                        layer[name] = layer[name] * 1.05
                v2 = pub.publish(layer, message="fine-tuned blocks.1.mlp")
                r = pub.last_report
                took = server.wait_version(v2)
                a2 = server.predict()
                fetched = _agent_report(store).get("bytes_fetched", 0)
                say(
                    f"3. Published v{v2} changing one layer: {r.tensors_changed} of {r.tensors_total} "
                    f"tensors, {_mb(r.bytes_uploaded)} uploaded ({_mb(r.bytes_skipped)} already "
                    f"in Redis); the server fetched {_mb(fetched)} and applied it in "
                    f"{took * 1000:.0f} ms. Answer: {a2['top']}."
                )

                broken = dict(layer)
                bad = broken["blocks.0.mlp.0.weight"].clone()
                bad[0, 0] = float("nan")
                broken["blocks.0.mlp.0.weight"] = bad
                v3 = pub.publish(broken, message="a run that diverged")
                report = _wait_rejected(store, v3)
                a3 = server.predict()
                reasons = "; ".join(
                    f"{name}: {', '.join(why)}" for name, why in report.get("rejection", {}).items()
                )
                kept = "still answers" if a3["fingerprint"] == a2["fingerprint"] else "CHANGED to"
                say(
                    f"4. Published v{v3} with a NaN in blocks.0.mlp.0.weight: the agent [red]rejected "
                    f"[/red]it ({reasons}); the server {kept} {a3['top']} from v{a3['version']}."
                )
                if a3["fingerprint"] != a2["fingerprint"] or a3["version"] != v2:
                    raise HotswapError("the server's answer changed after a rejected update")

                v4 = pub.rollback(to=v1, message="back to the first weights")
                took = server.wait_version(v4)
                a4 = server.predict()
                exact = a4["fingerprint"] == a1["fingerprint"]
                say(
                    f"5. Rolled back: v{v4} carries v{v1}'s tensors ({_mb(pub.last_report.bytes_uploaded)} "
                    f"uploaded); applied in {took * 1000:.0f} ms. Answer {a4['top']} is "
                    f"{'bit-exactly' if exact else 'NOT'} v{v1}'s (fingerprint {a4['fingerprint']})."
                )
                if not exact:
                    raise HotswapError("rollback did not restore the answer bit-exactly")

                say("6. hotswap status:")
                from publisher.cli import main as cli_main

                cli_main(
                    ["--redis-url", cfg.redis_url, "--namespace", cfg.namespace, "status", MODEL]
                )
            finally:
                if server is not None:
                    server.stop()
                    server = None
                if not embedded:
                    store.delete_all()
                pub.close()
                client.close()
        say(
            f"[green]Demo finished in {time.monotonic() - started:.1f}s[/green]; "
            "every process and file it started is gone."
        )
        return 0
    except KeyboardInterrupt:
        say("interrupted; cleaned up")
        return 130
    finally:
        if server is not None:
            server.stop()
