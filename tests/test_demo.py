"""``hotswap demo``: runs end to end, narrates real figures, and leaves nothing behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis
import torch

from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from publisher import cli
from publisher.publisher import Publisher

HOTSWAP = Path(sys.executable).with_name("hotswap")
README = Path(__file__).resolve().parents[1] / "README.md"
SERVER = "publisher.demo_server"  # the demo's server child: python -m publisher.demo_server
POLL = 0.05  # seconds one attempt waits for the demo to exit before sampling its children


def readme_transcript() -> list[str]:
    """The demo output README shows (``console`` block), minus the prompt and elisions."""
    body = re.search(r"^```console\n(.*?)^```$", README.read_text(), flags=re.M | re.S)
    assert body, "README shows no demo transcript"
    lines = body[1].strip().splitlines()
    assert lines[0] == "$ make demo"
    return [line for line in lines[1:] if not line.startswith("(")]


def as_pattern(line: str) -> str:
    """A README transcript line as a regex: its figures (numbers, hex) may differ."""
    parts = re.split(r"([0-9a-f]{16}|\d+(?:\.\d+)?)", line)
    return "".join(
        re.escape(part) if i % 2 == 0 else r"(?:[0-9a-f]{16}|\d+(?:\.\d+)?)"
        for i, part in enumerate(parts)
    )


class DemoRun:
    """``hotswap demo`` as a subprocess, watched: its output lines and every child it had."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [str(HOTSWAP), "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.children: dict[int, psutil.Process] = {}
        self.cmdlines: dict[int, list[str]] = {}
        self.cwds: dict[int, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.process.stdout.close()

    def _sample(self) -> None:
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in found:
            try:
                # Read at every sample: one first seen between fork and exec still shows
                # the demo's own command line.
                self.cmdlines[child.pid] = child.cmdline() or self.cmdlines.get(child.pid, [])
                if child.pid not in self.children:
                    self.children[child.pid] = child
                # redis-server rewrites its command line; its working directory is --dir.
                self.cwds[child.pid] = child.cwd()
            except psutil.Error:
                continue

    def poll(self, done: Callable[[], bool], attempts: int) -> bool:
        """Sample children until ``done()`` or the demo exits, at most ``attempts`` times."""
        for _ in range(attempts):
            self._sample()
            if done():
                return True
            try:
                self.process.wait(timeout=POLL)  # returns at once when the demo exits
            except subprocess.TimeoutExpired:
                continue
            self._sample()
            return done()
        return False

    def finish(self, attempts: int = 900) -> tuple[int, str]:
        """Wait for the demo to exit (sampling its children meanwhile): its code and output."""
        if not self.poll(lambda: self.process.poll() is not None, attempts):
            self.process.kill()
            raise AssertionError(f"demo still running after {attempts} attempts")
        code = self.process.wait()
        self._reader.join()  # the output ends when the demo's stdout closes
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return code, "".join(self.output)

    def started_by_demo(self, name: str) -> list[int]:
        return [pid for pid, cmd in self.cmdlines.items() if any(name in part for part in cmd)]

    def booting(self, name: str) -> bool:
        """The child ``name`` is loading torch (not serving yet) while the demo waits on it.

        Loading torch is well past the child's exec, so the demo has returned
        from starting it and sleeps reading its first line.
        """
        try:
            for pid in self.started_by_demo(name):
                maps = self.children[pid].memory_maps(grouped=True)
                if any("torch" in m.path for m in maps):
                    demo = psutil.Process(self.process.pid)
                    return bool(demo.status() == psutil.STATUS_SLEEPING)
        except psutil.Error:
            return False
        return False

    def assert_all_gone(self, servers: int = 3) -> None:
        """``servers``: how many example servers it started (web-1, canary-1, canary-2)."""
        redis_pids = self.started_by_demo("redis-server")
        server_pids = self.started_by_demo(SERVER)
        assert len(redis_pids) == 1, self.cmdlines
        assert len(server_pids) == servers, self.cmdlines
        for pid, child in self.children.items():
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, (
                f"demo left {self.cmdlines[pid]} running"
            )
        data_dir = Path(self.cwds[redis_pids[0]])
        assert data_dir.name.startswith("hotswap-redis-")
        assert not data_dir.exists(), f"demo left {data_dir} behind"


def test_demo_narrates_every_step_and_cleans_up(tmp_path: Path) -> None:
    demo = DemoRun(tmp_path)
    code, out = demo.finish()
    assert code == 0, out
    lines = out.splitlines()

    def step(number: int) -> str:
        found = [line for line in lines if line.startswith(f"{number}. ")]
        assert len(found) == 1, out
        return found[0]

    assert re.match(r"hotswap demo on a private redis-server \(pid \d+, port \d+\)\.", lines[0])
    assert "Started examples/serve.py" in step(1)
    assert re.match(
        r"2\. Published v1: all 28 tensors, \d\.\d\d MB uploaded in \d+ ms\. The server "
        r"fetched \d\.\d\d MB and applied v1 \d+ ms after the publish returned",
        step(2),
    )
    assert re.match(
        r"3\. Published v2, a fine-tune of one layer \(blocks\.1\.mlp\.\*\): 4 of 28 tensors "
        r"changed, 1\.18 MB uploaded in \d+ ms, \d\.\d\d MB already in Redis\. The server "
        r"fetched only those 4 tensors \(1\.18 MB\) and applied v2",
        step(3),
    )
    assert step(4).startswith("4. Published v3 with one NaN in blocks.0.mlp.0.weight")
    assert (
        "The agent rejected v3: blocks.0.mlp.0.weight: 1 of 147456 values are not finite" in step(4)
    )
    assert step(4).endswith("from v2, the same bytes as before.")
    assert step(5).startswith("5. Rolled back to v1: v4 is a new version with v1's tensors")
    assert step(5).endswith("bit-exactly v1's.")
    assert re.match(
        r"6\. Started two more servers on the canary track \(HOTSWAP_TRACK=canary\), named "
        r"canary-1 \(pid \d+\) and canary-2 \(pid \d+\) .*both run head v4",
        step(6),
    )
    # The rollout act: a valid but bad v5 refused by canary-1's probe, every pin taken
    # back, canary-2 (which served it) reverted, web-1 never applied it.
    assert "head stays v4. Rollout(pub, v5, canary='1') pinned it for both canaries" in step(7)
    assert re.search(
        r"canary-1 refused v5 \(probe outputs_in_bounds: logits on the fixed batch moved "
        r"\d+% from the last good version's \(at most 10%\)\) and put v4's bytes back before "
        r"any request saw them \(\d+ answers during the rollout, none from v5\)",
        step(7),
    )
    reverted = re.search(r"served v5 to (\d+) requests, answered from v4 again (\d+) ms", step(7))
    assert reverted, step(7)
    # Issue 17's target: a failed canary is back within a second of the rollout's decision.
    assert int(reverted[2]) < 1000, step(7)
    assert step(7).endswith(
        "the servers applied: web-1 [1, 2, 4], canary-1 [4], canary-2 [4, 5]: v5 never "
        "reached web-1."
    )
    assert re.match(
        r"8\. Published v6 with promote=False .* so the rollout made it head \d+\.\ds after it "
        r"began; web-1 applied v6 \d+ ms later\.",
        step(8),
    )
    assert step(9) == "9. hotswap status tiny:"
    status = out[out.index("9. hotswap status") :]
    assert "model tiny: head v6" in status
    row = r"│ +v6 │ idle +│ +0 │ "
    assert re.search(rf"-web-1 +│.*{row}v3: blocks\.0\.mlp\.0\.weight", status), status
    assert re.search(rf"-canary-1 +│.*{row}v5: <probes>: probe", status), status
    assert re.search(r"Demo finished in \d+\.\ds; the servers, Redis and every", lines[-1])
    # README's transcript is this output, figures aside.
    narration = [line for line in lines if re.match(r"(hotswap demo |\d\. |Demo finished)", line)]
    shown = readme_transcript()
    assert len(shown) == len(narration)
    for expected, actual in zip(shown, narration, strict=True):
        assert re.fullmatch(as_pattern(expected), actual), f"README: {expected}\nrun:    {actual}"
    demo.assert_all_gone()


def test_demo_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    demo = DemoRun(tmp_path)
    # Interrupt while the server child is still booting: the demo is blocked
    # reading its first line, the window where a child is easiest to orphan.
    assert demo.poll(lambda: demo.booting(SERVER), attempts=900), demo.cmdlines
    demo.process.send_signal(signal.SIGINT)
    code, out = demo.finish(attempts=600)
    assert code == 130, out
    assert "Interrupted: stopped the servers and Redis" in out
    assert "Traceback" not in out
    assert "2. Published" not in out
    demo.assert_all_gone(servers=1)  # interrupted while the first one booted


def test_demo_on_a_given_redis_deletes_only_its_own_keys(
    server: EmbeddedRedis,
    client: redis.Redis,
    settings: HotswapSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = settings.model_copy(update={"namespace": "other"})
    with Publisher("tiny", settings=other) as pub:
        pub.publish({"w": torch.arange(8.0)}, message="someone else's model")
    with Publisher("tiny", settings=settings) as pub:  # the default namespace, same model name
        pub.publish({"w": torch.ones(8)}, message="production")
    client.set("unrelated", b"keep me")
    before = {key: client.dump(key) for key in client.keys("*")}
    assert len(before) > 5

    for name in list(os.environ):
        if name.startswith("HOTSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    children_before = set(psutil.Process().children(recursive=True))

    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"under the namespace (hotswap-demo-[0-9a-f]{8}); its keys are deleted", out)
    assert found, out
    assert "bit-exactly v1's." in out and "model tiny: head v6" in out
    assert {key: client.dump(key) for key in client.keys("*")} == before
    # Its agent wrote status under the demo namespace, not under ours.
    assert client.hgetall("hotswap:{tiny}:agents") == {}
    started = set(psutil.Process().children(recursive=True)) - children_before
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_demo_takes_the_redis_url_from_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A throwaway server of this test's own, reporting every key written (keyspace events).
    with EmbeddedRedis(extra_args=["--notify-keyspace-events", "KA"]) as private:
        client = redis.Redis.from_url(private.url)
        with Publisher("tiny", settings=HotswapSettings(redis_url=private.url)) as pub:
            pub.publish({"w": torch.ones(8)}, message="production")
        client.set("unrelated", b"keep me")
        before = {key: client.dump(key) for key in client.keys("*")}
        assert len(before) > 5

        for name in list(os.environ):
            if name.startswith("HOTSWAP_"):
                monkeypatch.delenv(name)
        (tmp_path / ".env").write_text(f"HOTSWAP_REDIS_URL={private.url}\n")
        monkeypatch.chdir(tmp_path)

        # Events wait in the subscriber's connection until read after the run.
        watcher = redis.Redis.from_url(private.url)
        events = watcher.pubsub()
        events.psubscribe("__keyspace@0__:*")
        assert events.get_message(timeout=5)["type"] == "psubscribe"
        assert cli.main(["demo"]) == 0
        touched: set[str] = set()
        while (message := events.get_message(timeout=0.5)) is not None:
            touched.add(message["channel"].decode().removeprefix("__keyspace@0__:"))
        events.close()
        watcher.close()
        out = capsys.readouterr().out
        found = re.search(
            rf"hotswap demo on {re.escape(private.url)} under the namespace "
            r"(hotswap-demo-[0-9a-f]{8}); its keys are deleted",
            out,
        )
        assert found, out
        assert "bit-exactly v1's." in out
        namespace = found[1]
        # It wrote manifests, blobs and agent records, all under its own namespace...
        assert any(":blob:" in key for key in touched), touched
        assert any(key.startswith(f"{namespace}:{{tiny}}:manifest:") for key in touched), touched
        assert [key for key in touched if not key.startswith(f"{namespace}:")] == []
        # ...deleted every one of them, and left the rest as it was.
        assert client.exists(*touched) == 0
        assert {key: client.dump(key) for key in client.keys("*")} == before
        client.close()
