"""An agent reading blob chunks from replicas, in its own process (the replica read tests).

Settings come from the environment (``HOTSWAP_*``: the test sets the Redis URL,
``HOTSWAP_READ_FROM_REPLICAS`` and where the replicas are). The model is
``tensors()``'s shapes. Reads one command a line from stdin:

    WAIT <version>    -> APPLIED <version> <fingerprint> <counts as JSON>

``fingerprint`` is ``fingerprint(state)`` of the weights the model holds,
read under ``agent.reading()``; the test compares it with the published one.

    python tests/replica_worker.py MODEL
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from hotswap import codec
from hotswap.agent import Agent
from hotswap.settings import HotswapSettings

# Several tensors of several chunks each (at the 4 KiB chunks the tests use),
# so a version's blobs spread over every master of a cluster.
SHAPES = {f"layer{i}.weight": (64, 48 + 8 * i) for i in range(6)}


def tensors(seed: int, changed: set[str] | None = None, base: int = 0) -> dict[str, torch.Tensor]:
    """The probe model's weights: ``changed`` names (None: all) drawn from ``seed``,
    the others from ``base``."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        g = torch.Generator().manual_seed(
            (seed if changed is None or name in changed else base) * 100 + i
        )
        out[name] = torch.randn(shape, generator=g)
    return out


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """One digest over every tensor's name and bytes, in name order."""
    return codec.digest(
        b"".join(
            name.encode() + codec.digest(codec.as_bytes(state[name])).encode()
            for name in sorted(state)
        )
    )


@contextlib.contextmanager
def launch(model: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """This script as a process of its own, with ``env`` as its only ``HOTSWAP_*`` settings;
    killed on the way out if still running."""
    root = Path(__file__).resolve().parent.parent
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    full = {**clean, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HOTSWAP_ENV_FILE": ""}
    proc = subprocess.Popen(
        [sys.executable, __file__, model],
        cwd=root,
        env={**full, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("READY"), proc.stderr.read() if proc.stderr else ready
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def applied(proc: subprocess.Popen[str], version: int) -> tuple[str, dict[str, int]]:
    """Ask the process to wait for ``version``: the fingerprint of what its model then
    holds and its replica counts (``ReplicaCounts`` as a dict)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"WAIT {version}\n")
    proc.stdin.flush()
    words = proc.stdout.readline().split(maxsplit=3)
    assert words[:2] == ["APPLIED", str(version)], words
    return words[2], dict(json.loads(words[3]))


def main() -> int:
    model_name = sys.argv[1]
    torch.set_num_threads(1)
    state = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    with Agent(state, model_name, settings=HotswapSettings()) as agent:
        replicas = agent.store.blobs.replicas
        assert replicas is not None, "HOTSWAP_READ_FROM_REPLICAS is not on"
        print("READY", agent.agent_id, flush=True)
        for line in sys.stdin:
            word, arg = line.split()
            assert word == "WAIT", line
            version = int(arg)
            if not agent.wait_for(version, timeout=60):
                print("TIMEOUT", version, agent.state, flush=True)
                continue
            with agent.reading():
                found = fingerprint(state)
            counts = json.dumps(asdict(replicas.counts))
            print("APPLIED", agent.applied_version, found, counts, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
