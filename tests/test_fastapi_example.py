"""examples/fastapi_app.py, served by uvicorn in its own process against a real Redis.

Readiness flips once the agent has caught up, every answer carries the version
whose weights computed it (checked against the published weights), a refused
version leaves the server ready on the version before it, and SIGTERM stops
the agent through the lifespan.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from waiting import poll

from hotswap.embedded import EmbeddedRedis
from hotswap.reporter import agent_id
from hotswap.settings import HotswapSettings
from hotswap.status import decode as decode_status
from hotswap.store import Store
from publisher.publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "fastapi_app.py"
MODEL = "fastapi"
FEATURES = [0.25 * i - 2.0 for i in range(16)]

sys.path.insert(0, str(ROOT / "examples"))
import fastapi_app  # noqa: E402 - the example's own model builder, to compute expectations


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fastapi_app.build_model(seed).state_dict().items()}


def expected(state: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """What the app answers for FEATURES with ``state`` (None: its own initial weights)."""
    model = fastapi_app.build_model()
    if state is not None:
        model.load_state_dict(state)
    with torch.inference_mode():
        return model(torch.tensor([FEATURES]))[0]


def same(logits: list[float], want: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(logits), want, rtol=1e-5, atol=1e-6)


Start = Callable[[], tuple[subprocess.Popen[str], str]]


@pytest.fixture
def start_app(server: EmbeddedRedis) -> Iterator[Start]:
    """Starts the app in its own process (when the test says): (process, base URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    env.update(
        HOTSWAP_REDIS_URL=server.url,
        HOTSWAP_POLL_INTERVAL="0.5",
        HOTSWAP_SOCKET_TIMEOUT="1",
        HOTSWAP_CONNECT_TIMEOUT="1",
        HOTSWAP_RETRY_MAX_WAIT="0.2",
        HOTSWAP_AGENT_NAME="web-1",
        HOTSWAP_HEALTH_INTERVAL="0.2",
        PYTHONUNBUFFERED="1",
    )
    started: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--model-name", MODEL, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + _stderr(process)
        return process, line.split()[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def _stderr(process: subprocess.Popen[str]) -> str:
    if process.poll() is None or process.stderr is None:
        return ""
    return process.stderr.read()


def answered(http: httpx.Client, path: str) -> bool:
    try:
        http.get(path)
    except httpx.TransportError:
        return False
    return True


def predict(http: httpx.Client) -> tuple[str, list[float]]:
    reply = http.post("/predict", json={"features": FEATURES})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    header = reply.headers["X-Model-Version"]
    assert header == str(body["version"])
    return header, body["logits"]


def test_ready_flips_once_caught_up_and_answers_follow_each_version(
    server: EmbeddedRedis,
    client: redis.Redis,
    settings: HotswapSettings,
    start_app: Start,
) -> None:
    pub = Publisher(MODEL, settings=settings, connection=client)
    v1 = pub.publish(weights(1))
    # Redis frozen while the app starts: alive, serving its own weights, not ready.
    server.freeze()
    try:
        process, base = start_app()
    except BaseException:
        server.thaw()
        raise
    http = httpx.Client(base_url=base, timeout=10)
    try:
        try:
            assert poll(lambda: answered(http, "/healthz"), 1500), _stderr(process)
            health = http.get("/healthz")
            assert health.status_code == 200 and health.json()["alive"] is True
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["ready"] is False
            assert ready.json()["reason"] in (
                "the agent has not read head from Redis yet",
                "Redis is unreachable and head was never read",
            )
            header, logits = predict(http)
            assert header == "None" and same(logits, expected(None))
        finally:
            server.thaw()

        # Redis back: the agent reads head, applies v1, and the probe flips.
        assert poll(lambda: http.get("/readyz").status_code == 200, 1500)
        assert http.get("/readyz").json()["reason"] == f"runs head v{v1}"
        header, logits = predict(http)
        assert header == str(v1) and same(logits, expected(weights(1)))

        # Publishes under load: every answer's logits are those of the version it names.
        wanted = {str(v1): expected(weights(1))}
        answers: list[tuple[str, list[float]]] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=base, timeout=10) as own:
                while not stop.is_set():
                    try:
                        answers.append(predict(own))
                    except Exception as e:  # any failed request is what this test looks for
                        failures.append(repr(e))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            # Under load from the first publish on (the loader's client takes a while to start).
            assert poll(lambda: len(answers) > 0 or bool(failures), 1500), failures
            for seed in (2, 3, 4):
                version = pub.publish(weights(seed))
                wanted[str(version)] = expected(weights(seed))
                assert poll(lambda v=version: predict(http)[0] == str(v), 1500)
                assert http.get("/readyz").json()["reason"] == f"runs head v{version}"
        finally:
            stop.set()
            loader.join(10)
        assert failures == []
        assert answers and all(same(logits, wanted[h]) for h, logits in answers)
        seen = [int(h) for h, _ in answers]
        assert seen == sorted(seen)  # never backwards
        last = version

        # The app's health numbers reach its status record, under the agent's stable id.
        store = Store(client, MODEL)

        def reported() -> dict[str, float]:
            records = {name: raw for name, raw, _alive in store.agent_records()}
            raw = records.get(agent_id("web-1"))
            return {} if raw is None else decode_status(raw).health or {}

        assert poll(lambda: reported().get("requests", 0) >= len(answers), 1500), reported()
        numbers = reported()
        assert numbers["error_rate"] == 0.0  # every request of the load answered 200
        assert 0 < numbers["p99_ms"] < 10_000

        # A NaN version is refused: still ready, still the last good weights.
        bad = weights(5)
        bad["0.weight"][0, 0] = float("nan")
        refused = pub.publish(bad)

        def refused_seen() -> bool:
            return http.get("/readyz").json()["rejected_version"] == refused

        assert poll(refused_seen, 1500)
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["reason"] == f"refused head v{refused}: serving v{last}"
        header, logits = predict(http)
        assert header == str(last) and same(logits, wanted[str(last)])

        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert f'hotswap_rejections_total{{model="{MODEL}"}} 1.0' in text
        lines = [line for line in text.splitlines() if f'model="{MODEL}"' in line]
        assert any(ln.startswith("hotswap_lag_versions{") and ln.endswith(" 1.0") for ln in lines)
        assert any(
            ln.startswith("hotswap_head_version{") and ln.endswith(f" {float(refused)}")
            for ln in lines
        )
        assert any(
            ln.startswith("hotswap_agent_state{") and 'state="idle"' in ln and ln.endswith(" 1.0")
            for ln in lines
        )
    finally:
        http.close()
        pub.close()

    # SIGTERM: uvicorn drains, the lifespan stops the agent, whose record says so.
    # (uvicorn 0.29+ raises the signal again once shut down, so the exit status
    # is the signal's; older ones exit 0.)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    stderr = _stderr(process)
    assert "Traceback" not in stderr, stderr
    records = Store(client, MODEL).agent_records()
    assert len(records) == 1
    assert records[0][0] == agent_id("web-1")
    record = decode_status(records[0][1])
    assert (record.state, record.version, record.pid) == ("stopped", last, process.pid)


def test_bad_input_is_a_422_and_changes_nothing(start_app: Start) -> None:
    _process, base = start_app()
    with httpx.Client(base_url=base, timeout=10) as http:
        assert poll(lambda: answered(http, "/healthz"), 1500)
        before = predict(http)
        for body in ({"features": [1.0] * 15}, {"features": ["x"] * 16}, {"tokens": [1]}):
            reply = http.post("/predict", json=body)
            assert reply.status_code == 422, reply.text
            assert "X-Model-Version" not in reply.headers
        assert predict(http) == before


def test_readme_commands_for_the_examples_take_the_options_they_show() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"`python (examples/\w+\.py)([^`]*)`", text)
    assert {path for path, _ in commands} >= {"examples/fastapi_app.py"}
    for path, args in commands:
        if path.endswith("ray_serve_app.py") and importlib.util.find_spec("ray") is None:
            continue  # its --help imports Ray (tests/test_ray_serve_example.py says more)
        shown = subprocess.run(
            [sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for option in re.findall(r"--[a-z-]+", args):
            assert option in shown, f"README: `python {path}{args}`: no option {option}"
