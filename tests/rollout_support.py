"""Shared by the canary-rollout process tests (tests/test_rollout_process.py and
tests/ha/test_rollout_failover.py): the serving processes of ``rollout_worker.py``,
the ``hotswap rollout`` command as a process of its own, and the model's versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hotswap import codec

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("rollout_worker.py")
MODEL = "m"


def state(seed: int, *, probe_bad: bool = False, sick: bool = False) -> dict[str, torch.Tensor]:
    """A version of the worker's model: random weights, and the marks it reads
    (``mark[1]`` fails the probe, ``mark[2]`` raises the reported error rate)."""
    g = torch.Generator().manual_seed(seed)
    mark = torch.tensor([5.0 + seed / 100, 9.5 if probe_bad else 0.0, 9.5 if sick else 0.0, 1.0])
    return {"w": torch.rand(64, 64, generator=g), "mark": mark}


def digests(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(t)) for k, t in sd.items()}


class Worker:
    """``rollout_worker.py`` in its own process, idle until it is told to ``serve``; send a
    command, read its JSON reply."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        self.idle = False
        self.name, self.agent_id, self.started_at = "", "", 0.0

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker {self.name} exited with {self.proc.wait(10)}"
        reply: dict[str, Any] = json.loads(line)
        if reply.get("idle"):
            self.idle = True
            return self.read()
        return reply

    def ask_serve(
        self,
        url: str,
        name: str,
        track: str = "stable",
        *,
        heartbeat_ttl: float = 10.0,
        model: str = MODEL,
        probe: bool = False,
        poll: float = 0.3,
    ) -> None:
        """Tell the process to start an agent (``served`` reads the answer)."""
        self.name = name
        fields = {"url": url, "model": model, "name": name, "track": track, "poll": poll}
        self.send("serve", **fields, heartbeat_ttl=heartbeat_ttl, probe=probe)

    def served(self) -> Worker:
        line = self.read()
        self.agent_id, self.started_at = line["ready"], float(line["at"])
        return self

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.read()

    def until(self, version: int, timeout: float = 20.0) -> dict[str, Any]:
        """Wait (bounded, in the worker) until it runs ``version``; its state then."""
        reply = self("until", version=version, timeout=timeout)
        assert reply["ok"], f"{self.name} runs v{reply['applied']}, not v{version}: {reply}"
        return reply

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(10)
        self._close_pipes()

    def close(self) -> None:
        """Quit (stopping the agent, if any) and wait for the process to exit."""
        if self.alive:
            try:
                self.send("quit")
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


class Pool:
    """Idle worker processes to hand: a test takes some (they serve an agent), gives them
    back (they stop it); a process killed by a test is replaced by a new one."""

    def __init__(self, size: int) -> None:
        self.idle = [Worker() for _ in range(size)]
        self.busy: list[Worker] = []

    def serve(self, url: str, *specs: tuple[str, str], **options: Any) -> list[Worker]:
        """Workers serving agents named and tracked as ``specs`` says, side by side;
        ``options`` go to each (``probe=NAME`` gives only that one the probe)."""
        probe = options.pop("probe", "")
        while len(self.idle) < len(specs):
            self.idle.append(Worker())
        taken, self.idle = self.idle[: len(specs)], self.idle[len(specs) :]
        self.busy.extend(taken)
        for w, (name, track) in zip(taken, specs):
            w.ask_serve(url, name, track, probe=name == probe, **options)
        return [w.served() for w in taken]

    def give_back(self) -> None:
        """Stop every agent the taken workers serve, side by side; the processes idle."""
        alive = [w for w in self.busy if w.alive]
        for w in alive:
            w.send("stop")
        for w in alive:
            assert w.read() == {"stopped": True}
        self.idle.extend(alive)
        self.busy = []

    def close(self) -> None:
        for w in self.idle + self.busy:
            if w.alive:
                try:
                    w.send("quit")
                except BrokenPipeError:
                    pass
        for w in self.idle + self.busy:
            w.close()


def versions(history: list[dict[str, Any]], event: str | None = None) -> list[int]:
    """The versions of a worker's history, in order (of one kind of event if named)."""
    return [e["version"] for e in history if event is None or e["event"] == event]


def times(history: list[dict[str, Any]], event: str, version: int) -> list[float]:
    return [e["at"] for e in history if e["event"] == event and e["version"] == version]


def cli_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of a ``hotswap`` process: ``settings``' HOTSWAP_* and no others."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")},
        "HOTSWAP_RETRY_ATTEMPTS": "4",
        "HOTSWAP_RETRY_MAX_WAIT": "0.5",
        "HOTSWAP_CONNECT_TIMEOUT": "1",
        "HOTSWAP_SOCKET_TIMEOUT": "2",
        "PYTHONPATH": str(ROOT),
        **settings,
    }


def rollout_command(*args: str, model: str = MODEL) -> list[str]:
    return [sys.executable, "-m", "publisher", "rollout", model, *args]


def hotswap_rollout(
    settings: Mapping[str, str], *args: str, model: str = MODEL, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """``hotswap rollout MODEL ARGS...`` to its end, as a process of its own."""
    return subprocess.run(
        rollout_command(*args, model=model),
        env=cli_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def started_rollout(
    settings: Mapping[str, str], *args: str, model: str = MODEL
) -> subprocess.Popen[str]:
    """``hotswap rollout`` started in the background (the test kills or waits for it)."""
    return subprocess.Popen(
        rollout_command(*args, model=model),
        env=cli_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
