"""examples/ray_serve_app.py under a real Ray Serve, against a real Redis (slow).

Ray is not part of the dev extra (``pip install -e '.[ray]'``): without it, or
where a local Ray cannot start, the test is skipped and says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from waiting import poll

from hotswap.embedded import EmbeddedRedis, free_port
from hotswap.settings import HotswapSettings
from hotswap.status import decode as decode_status
from hotswap.store import Store
from publisher.publisher import Publisher

pytest.importorskip(
    "ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' to run this test"
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ray_serve_app.py"
MODEL = "rayserve"
REPLICAS = 2
FEATURES = [0.5 - 0.125 * i for i in range(16)]
ROUTES = ("/async", "/sync")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

sys.path.insert(0, str(ROOT / "examples"))
import ray_serve_app  # noqa: E402 - the example's own model builder, to compute expectations


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ray_serve_app.build_model(seed).state_dict().items()}


def expected(state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = ray_serve_app.build_model()
    model.load_state_dict(state)
    with torch.inference_mode():
        return model(torch.tensor([FEATURES]))[0]


def same(logits: list[float], want: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(logits), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ray_starts() -> None:
    """Skip, with Ray's own words, where a local Ray instance cannot start here."""
    probe = (
        "import ray; ray.init(address='local', include_dashboard=False, "
        "_node_ip_address='127.0.0.1'); ray.shutdown()"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"a local Ray instance cannot start on this machine: {last}")


@pytest.fixture
def deployed(
    ray_starts: None, server: EmbeddedRedis, client: redis.Redis
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOTSWAP_", "RAY_"))}
    env.update(HOTSWAP_REDIS_URL=server.url, HOTSWAP_POLL_INTERVAL="0.5", PYTHONUNBUFFERED="1")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            *("--model-name", MODEL, "--port", str(port), "--replicas", str(REPLICAS)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            process.kill()
            stderr = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"the example did not start: {line!r}\n{stderr[-4000:]}")
        yield process, line.split()[-1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def ask(http: httpx.Client, route: str) -> tuple[str, list[float], int]:
    reply = http.post(route + "/", json={"features": FEATURES})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert reply.headers["X-Model-Version"] == str(body["version"])
    return reply.headers["X-Model-Version"], body["logits"], body["pid"]


def every_replica_answers(
    http: httpx.Client, route: str, version: int, want: dict[str, torch.Tensor]
) -> bool:
    """Ask until each replica of ``route`` answered from ``version``; every answer on
    the way must hold the logits of the version it names."""
    answers: dict[int, str] = {}

    def all_at_version() -> bool:
        header, logits, pid = ask(http, route)
        if header == "None":
            return False  # a replica whose agent applied nothing yet: the model's own weights
        assert same(logits, want[header]), f"{route} v{header} answered other logits"
        answers[pid] = header
        return len(answers) == REPLICAS and set(answers.values()) == {str(version)}

    return poll(all_at_version, 1500)


def test_sync_and_async_replicas_each_apply_every_version(
    settings: HotswapSettings,
    client: redis.Redis,
    server: EmbeddedRedis,
    deployed: tuple[subprocess.Popen[str], str],
) -> None:
    process, base = deployed
    want: dict[str, torch.Tensor] = {}
    with (
        Publisher(MODEL, settings=settings, connection=client) as pub,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        for seed in (1, 2):
            version = pub.publish(weights(seed))
            want[str(version)] = expected(weights(seed))
            for route in ROUTES:
                assert every_replica_answers(http, route, version, want), (route, version)
                ready = http.get(route + "/readyz")
                assert ready.status_code == 200
                assert ready.json()["reason"] == f"runs head v{version}"
        records = Store(client, MODEL).agent_records()
        assert len(records) == 2 * REPLICAS  # one agent per replica

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    states = {decode_status(raw).state for _id, raw, _alive in Store(client, MODEL).agent_records()}
    assert states == {"stopped"}
