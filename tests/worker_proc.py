"""A serving worker script (serving_worker.py, hf_worker.py) run as its own process,
as in production: started, its agent's id read from its READY line, its agent's
Redis record read back while it serves, and its last JSON line as the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hotswap.status import AgentStatus
from hotswap.status import decode as decode_status
from hotswap.store import Store

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A started worker process and its agent's id."""

    def __init__(self, proc: subprocess.Popen[str], agent_id: str, records: Store) -> None:
        self.proc = proc
        self.agent_id = agent_id
        self.records = records

    def record(self) -> AgentStatus | None:
        """The worker's agent record in Redis, or None before its first write."""
        for found, raw, _alive in self.records.agent_records():
            if found == self.agent_id:
                return decode_status(raw)
        return None

    def version(self) -> int:
        """The version its record says it runs (0: none yet)."""
        record = self.record()
        return (record.version or 0) if record is not None else 0

    def runs(self, version: int) -> bool:
        """Whether its record says it runs ``version`` or newer."""
        return self.version() >= version

    def result(self, timeout: float = 60) -> dict[str, Any]:
        """Its last output line as JSON, once it has exited with 0."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out.strip().splitlines()[-1]))


@contextmanager
def worker(script: Path, url: str, model: str, last: int, records: Store) -> Iterator[Worker]:
    """Run ``script URL MODEL --last LAST``; killed on the way out if still running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), url, model, "--last", str(last)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("READY"), proc.stderr.read() if proc.stderr else ready
        yield Worker(proc, ready.split()[1], records)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
