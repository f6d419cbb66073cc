"""The issue's worst finding, end to end: a serving process whose agent is sent a
checkpoint with ``bert.``-prefixed names refuses it, keeps its weights, and its
status record in Redis never says that version runs (tests/names_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from agent_support import MODEL, Ten, bump, commit_raw
from waiting import poll

from hotswap import codec
from hotswap.settings import HotswapSettings
from hotswap.status import AgentStatus
from hotswap.status import decode as decode_status
from hotswap.store import Store

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("names_worker.py")
REFUSED = (
    "0 of 10 live tensors matched (at least 50% must); the manifest's names start with "
    "`bert.`: try `Agent(names=NameMap(strip_prefix='bert.'))`; not matched: 'head.weight', "
    "'layers.0.bias', 'layers.0.weight' (+7 more); the manifest's names not in the model: "
    "'bert.head.weight', 'bert.layers.0.bias', 'bert.layers.0.weight' (+7 more)"
)


class Worker:
    def __init__(self, proc: subprocess.Popen[str], agent_id: str) -> None:
        self.proc, self.agent_id = proc, agent_id

    def wait(self, version: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"wait {version}\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return answer


@contextmanager
def worker(settings: HotswapSettings, *args: str) -> Iterator[Worker]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), settings.redis_url, MODEL, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.startswith("READY"), proc.stderr.read() if proc.stderr else ready
        yield Worker(proc, ready.split()[1])
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def digests(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(t)) for k, t in state.items()}


def record(store: Store, agent_id: str, check: Any) -> AgentStatus:
    """The worker's status record, once one that passes ``check`` landed in Redis."""
    found: list[AgentStatus] = []

    def landed() -> bool:
        for got, raw, _alive in store.agent_records():
            if got == agent_id and check(status := decode_status(raw)):
                found.append(status)
                return True
        return False

    assert poll(landed), f"no status record as expected for {agent_id}"
    return found[0]


def test_a_bert_prefixed_checkpoint_is_refused_by_a_serving_process(
    settings: HotswapSettings, store: Store
) -> None:
    v1_state = bump(Ten().state_dict())
    v1 = commit_raw(store, v1_state)
    with worker(settings) as w:
        first = w.wait(v1)
        assert first["applied"] is True and first["digests"] == digests(v1_state)
        v2_state = bump(v1_state)
        v2 = commit_raw(store, {"bert." + k: t for k, t in v2_state.items()})
        second = w.wait(v2)
        assert second["error"] == f"model 'm' v{v2} rejected: {REFUSED}"
        assert second["reasons"] == {"<coverage>": [REFUSED]}
        assert second["applied_version"] == v1
        assert second["digests"] == digests(v1_state)  # the model runs v1's bytes still
        status = record(store, w.agent_id, lambda s: s.rejected_version == v2)
        assert status.version == v1 and status.state == "idle"
        assert status.rejection == {"<coverage>": [REFUSED[:300]]}
    assert store.head() == v2
    # The fix the message names: the same checkpoint, with the prefix stripped.
    with worker(settings, "--strip", "bert.") as w:
        fixed = w.wait(v2)
        assert fixed["applied"] is True and fixed["applied_version"] == v2
        assert fixed["digests"] == digests(v2_state)
        assert record(store, w.agent_id, lambda s: s.version == v2).rejected_version is None
