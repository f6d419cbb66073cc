"""examples/serve.py: the HTTP routes, answers during publishes, clean SIGTERM shutdown."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
import torch
from waiting import poll

from hotswap import ValidationError
from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.status import decode as decode_status
from hotswap.store import Store
from publisher.demo_model import build
from publisher.publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "serve.py"
MODEL = "tiny"


def load_serve() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_serve", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(base: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(base + path, data=body)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def predict(base: str, tokens: object) -> tuple[int, dict[str, Any]]:
    return call(base, "/predict", json.dumps({"tokens": tokens}).encode())


def wait_version(base: str, version: int, attempts: int = 750) -> dict[str, Any]:
    """/version once the server runs ``version`` and reports what its apply cost."""
    answers: list[dict[str, Any]] = []

    def reached() -> bool:
        answers.append(call(base, "/version")[1])
        last = answers[-1]
        return bool(last["version"] == version and last["last_apply"].get("version") == version)

    assert poll(reached, attempts), f"server did not reach v{version}: {answers[-1]}"
    return answers[-1]


def applied_answer(base: str, server: Any, version: int) -> dict[str, Any]:
    """/version once the in-process server's agent has applied ``version``.

    ``wait_for`` returns after ``on_applied`` ran, so /version already reports it.
    """
    assert server.agent.wait_for(version, 15), f"server did not reach v{version}"
    answer = call(base, "/version")[1]
    assert answer["version"] == version and answer["last_apply"]["version"] == version, answer
    return answer


def variant(base: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Version k: one block's MLP scaled a little, so each version answers differently."""
    prefix = f"blocks.{k % 2}.mlp."
    return {n: t * (1 + 0.01 * k) if n.startswith(prefix) else t for n, t in base.items()}


@pytest.fixture
def served(settings: HotswapSettings) -> Iterator[tuple[str, Any]]:
    """The example server in this process (its agent talks to the test Redis)."""
    serve = load_serve()
    server = serve.make_server(MODEL, settings)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        thread.join(5)
        serve.close_server(server)


def test_version_and_healthz_follow_publishes_and_rejections(
    served: tuple[str, Any], settings: HotswapSettings
) -> None:
    base, server = served
    status, answer = call(base, "/version")
    assert (status, answer) == (200, {"version": None, "last_apply": {}})
    weights = build(seed=1).state_dict()
    with Publisher(MODEL, settings=settings) as pub:
        v1 = pub.publish(weights)
        info = applied_answer(base, server, v1)["last_apply"]
        initial = build(seed=0).state_dict()  # what the server started from
        differ = [n for n, t in weights.items() if not torch.equal(t, initial[n])]
        assert 0 < info["tensors_changed"] == len(differ) < len(weights)
        # The tied head and embedding share one storage: fetched once.
        tied = weights["embed.weight"].nbytes
        expected = sum(weights[n].nbytes for n in differ) - tied
        assert info["bytes_fetched"] == expected
        status, health = call(base, "/healthz")
        assert status == 200
        assert health["state"] == "idle" and health["version"] == v1
        assert health["head"] == v1 and health["lag"] == 0 and health["redis_error"] is None
        assert "last_rejection" not in health

        broken = dict(weights)
        broken["norm.weight"] = torch.full_like(weights["norm.weight"], float("inf"))
        v2 = pub.publish(broken)
        with pytest.raises(ValidationError):
            server.agent.wait_for(v2, 15)
        # The head /healthz reports is cached for a second: ask until it moved.
        replies: list[tuple[int, dict[str, Any]]] = []

        def head_moved() -> bool:
            replies.append(call(base, "/healthz"))
            return bool(replies[-1][1]["head"] == v2)

        assert poll(head_moved), replies[-1]
        status, health = replies[-1]
    assert status == 200  # still serving v1: healthy, one version behind
    assert (health["version"], health["head"], health["lag"]) == (v1, v2, 1)
    assert "'norm.weight'" in health["last_rejection"] and "not finite" in health["last_rejection"]
    assert call(base, "/version")[1]["version"] == v1


def test_readyz_waits_for_head_and_a_refused_head_keeps_it_ready(
    served: tuple[str, Any], settings: HotswapSettings
) -> None:
    base, server = served
    # Nothing published: once the agent has read head, its own weights are what to serve.
    assert poll(lambda: call(base, "/readyz")[0] == 200)
    assert call(base, "/readyz")[1]["reason"] == (
        "no version is published: serving the model's own weights"
    )
    weights = build(seed=1).state_dict()
    with Publisher(MODEL, settings=settings) as pub:
        v1 = pub.publish(weights)
        assert server.agent.wait_for(v1, 15)
        status, ready = call(base, "/readyz")
        assert (status, ready["ready"], ready["reason"]) == (200, True, f"runs head v{v1}")
        broken = dict(weights)
        broken["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
        v2 = pub.publish(broken)
        with pytest.raises(ValidationError):
            server.agent.wait_for(v2, 15)
    status, ready = call(base, "/readyz")
    assert status == 200 and ready["reason"] == f"refused head v{v2}: serving v{v1}"
    assert (ready["version"], ready["head"], ready["lag"]) == (v1, v2, 1)
    # A stopped agent: neither alive nor ready.
    server.agent.stop()
    assert call(base, "/readyz") == (
        503,
        {
            **ready,
            "ready": False,
            "alive": False,
            "reason": "the agent has stopped",
            "state": "stopped",
        },
    )
    assert call(base, "/healthz")[0] == 503


def test_predict_answers_with_version_and_fingerprint(served: tuple[str, Any]) -> None:
    base, _ = served
    status, first = predict(base, [5, 17, 42])
    assert status == 200
    assert first["version"] is None
    assert len(first["top"]) == 5 and all(0 <= t < 2000 for t in first["top"])
    assert len(first["fingerprint"]) == 16
    assert predict(base, [5, 17, 42])[1] == first  # same weights, same bytes out
    assert predict(base, [5, 17, 43])[1]["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "body must be 1 to 65536 bytes of JSON"),
        (b"{not json", "body is not JSON: Expecting property name enclosed in double quotes"),
        (b'{"tokens": []}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": [1, 2000]}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": [1, -1]}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": [1.0]}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": [true]}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": "1 2 3"}', 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b'{"tokens": [' + b"1," * 512 + b"1]}", 'expected {"tokens": [1 to 512 ints'),
        (b"[1, 2, 3]", 'expected {"tokens": [1 to 512 ints in [0, 2000)]}'),
        (b"\xff\xfe", "body is not JSON"),
    ],
)
def test_bad_predict_input_is_a_400_and_changes_nothing(
    served: tuple[str, Any], body: bytes, error: str
) -> None:
    base, server = served
    before = predict(base, [1, 2, 3])[1]
    weights = {n: t.clone() for n, t in server.model.state_dict().items()}
    status, answer = call(base, "/predict", body)
    assert status == 400
    assert answer["error"].startswith(error)
    assert predict(base, [1, 2, 3])[1] == before
    for name, tensor in server.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_unknown_routes_are_404(served: tuple[str, Any]) -> None:
    base, _ = served
    assert call(base, "/nope") == (404, {"error": "no route GET /nope"})
    assert call(base, "/version", b"{}") == (404, {"error": "no route POST /version"})


def test_serves_every_request_while_publishing_then_stops_on_sigterm(
    server: EmbeddedRedis, client: redis.Redis, settings: HotswapSettings
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    env.update(HOTSWAP_REDIS_URL=server.url, HOTSWAP_POLL_INTERVAL="0.5", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model-name", MODEL, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        base = line.split()[-1]

        answers: list[dict[str, Any]] = []
        failures: list[str] = []
        stop = threading.Event()
        answered_by_last = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    status, answer = predict(base, [5, 17, 42, 7])
                except Exception as e:  # any failed request is what this test looks for
                    failures.append(repr(e))
                    continue
                if status != 200:
                    failures.append(f"{status} {answer}")
                answers.append(answer)
                if answer.get("version") == 10:
                    answered_by_last.set()

        loader = threading.Thread(target=load)
        loader.start()
        weights = build(seed=1).state_dict()
        try:
            with Publisher(MODEL, settings=settings) as pub:
                versions = [pub.publish(variant(weights, k), message=f"v{k}") for k in range(10)]
            assert versions == list(range(1, 11))
            wait_version(base, 10)
            assert answered_by_last.wait(10), "no answer from v10"
        finally:
            stop.set()
            loader.join(10)

        assert failures == []
        assert len(answers) >= 10
        seen = [a["version"] for a in answers]
        assert seen == sorted(seen, key=lambda v: -1 if v is None else v)  # never backwards
        assert seen[-1] == 10
        # One version at a time: every answer of a version came from the same bytes.
        by_version: dict[int | None, set[str]] = {}
        for a in answers:
            by_version.setdefault(a["version"], set()).add(a["fingerprint"])
        assert all(len(prints) == 1 for prints in by_version.values()), by_version
        assert len({next(iter(p)) for p in by_version.values()}) == len(by_version)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        stderr = process.stderr.read() if process.stderr else ""
        assert "serve: stopped" in stderr
        assert "Traceback" not in stderr
        records = Store(client, MODEL).agent_records()
        assert len(records) == 1
        record = decode_status(records[0][1])
        assert (record.state, record.version, record.pid) == ("stopped", 10, process.pid)
        with pytest.raises(urllib.error.URLError):
            call(base, "/healthz")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
