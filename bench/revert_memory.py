"""A serving process's resident memory with the revert bytes kept (issue 17's memory target).

    python -m bench.revert_memory [--changed-mib 16] [--model-mib 64] [--versions 6]

A serving process of its own holds a float32 model of ``--model-mib`` MiB
and an agent with the default settings (so the default revert budget: one
version's replaced bytes). Versions that each rewrite ``--changed-mib`` MiB
(whole tensors) are published to it. The child reports its resident memory
with the model and nothing else, then its peak (``VmHWM``, reset after the
first version: that one rewrites the whole model) over the steady-state
versions. The target: the peak over the model at most two copies of the
changed bytes (the staged new bytes and the kept old ones), plus the
runtime's own growth, shown beside it as measured by an agent that applies
versions with the revert budget at 0 in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch

MiB = 1024 * 1024
BLOCK_MIB = 4


def _status(field: str) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _held() -> int:
    """Resident bytes the kernel cannot take back at no cost: RSS less ``LazyFree``
    (a kept staging arena between versions, which the kernel drops under pressure)."""
    fields: dict[bytes, int] = {}
    with open("/proc/self/smaps_rollup", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"Rss", b"LazyFree"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields[b"Rss"] - fields.get(b"LazyFree", 0)


class HeldPeak:
    """Samples ``_held`` every millisecond on a thread; ``take()`` returns and resets the peak."""

    def __init__(self) -> None:
        self.peak = _held()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            now = _held()
            with self._lock:
                self.peak = max(self.peak, now)
            time.sleep(0.001)

    def take(self) -> int:
        with self._lock:
            peak, self.peak = self.peak, _held()
        return peak


def child(url: str, model_mib: int, revert_bytes: str) -> int:
    """The serving process: reports RSS with the model, then peaks, on its stdout."""
    from hotswap import Agent, HotswapSettings

    blocks = max(1, model_mib // BLOCK_MIB)
    rows = BLOCK_MIB * MiB // 4096
    model = {f"b{i}": torch.zeros(rows, 1024) for i in range(blocks)}
    for t in model.values():
        t.fill_(1.0)  # resident: the model's pages are faulted in
    extra: dict[str, Any] = {} if revert_bytes == "default" else {"revert_bytes": 0}
    settings = HotswapSettings(redis_url=url, _env_file=None, **extra)  # type: ignore[call-arg]
    with_model = _status("VmRSS")
    held = HeldPeak()
    agent = Agent(model, "revmem", settings=settings).start()
    print(json.dumps({"model_rss": with_model}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "wait":
            ok = agent.wait_for(int(request["version"]), 120)
            reply = {"ok": ok, "peak": _status("VmHWM"), "held": held.take()}
            if request.get("reset"):
                _reset_peak()
                held.take()
            print(json.dumps(reply), flush=True)
        else:
            break
    agent.stop()
    return 0


def measure(url: str, args: argparse.Namespace, revert_bytes: str) -> dict[str, int]:
    from publisher import Publisher

    blocks = max(1, args.model_mib // BLOCK_MIB)
    changed = max(1, min(blocks, args.changed_mib // BLOCK_MIB))
    rows = BLOCK_MIB * MiB // 4096
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.revert_memory",
            "--child",
            url,
            str(args.model_mib),
            revert_bytes,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")},
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply: dict[str, Any] = json.loads(proc.stdout.readline())
        return reply

    first = json.loads(proc.stdout.readline())
    state = {f"b{i}": torch.full((rows, 1024), 2.0) for i in range(blocks)}
    peaks: list[int] = []
    helds: list[int] = []
    with Publisher("revmem", settings=_settings(url)) as pub:
        pub.store.delete_all()
        ask({"cmd": "wait", "version": pub.publish(state)})
        # Warm-up: the first version rewrites the whole model and the second
        # replaces what the first kept; the steady state starts after them.
        for step in range(args.versions + 1):
            for i in range(changed):
                state[f"b{i}"].fill_(float(step + 3))
            reply = ask({"cmd": "wait", "version": pub.publish(state), "reset": step == 0})
            if not reply["ok"]:
                raise RuntimeError(f"the serving process did not apply version {step + 2}")
            if step > 0:
                peaks.append(int(reply["peak"]))
                helds.append(int(reply["held"]))
        pub.store.delete_all()
    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    proc.stdin.close()
    proc.wait(30)
    return {
        "model_rss": int(first["model_rss"]),
        "peak": max(peaks),
        "held": max(helds),
        "changed": changed,
    }


def _settings(url: str) -> Any:
    from hotswap import HotswapSettings

    return HotswapSettings(redis_url=url, _env_file=None)  # type: ignore[call-arg]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1], int(argv[2]), argv[3])
    p = argparse.ArgumentParser(prog="python -m bench.revert_memory", description=__doc__)
    p.add_argument("--changed-mib", type=int, default=16)
    p.add_argument("--model-mib", type=int, default=64)
    p.add_argument("--versions", type=int, default=6)
    args = p.parse_args(argv)
    from hotswap.embedded import EmbeddedRedis

    with EmbeddedRedis() as srv:
        kept = measure(srv.url, args, "default")
        none = measure(srv.url, args, "0")
    changed = kept["changed"] * BLOCK_MIB * MiB
    base = kept["model_rss"]
    print(
        f"serving process memory: {args.model_mib} MiB model, versions rewriting "
        f"{kept['changed'] * BLOCK_MIB} MiB, {args.versions} steady-state versions "
        "(peaks over the process with the model alone)"
    )
    print(f"  the process with the model alone   {base / MiB:8.1f} MiB resident")
    print("                                      revert kept   no revert bytes")
    print(
        f"  peak RSS over it                   {(kept['peak'] - base) / MiB:8.1f}"
        f"      {(none['peak'] - none['model_rss']) / MiB:8.1f} MiB"
    )
    print(
        f"  peak RSS less LazyFree over it     {(kept['held'] - base) / MiB:8.1f}"
        f"      {(none['held'] - none['model_rss']) / MiB:8.1f} MiB"
    )
    held = kept["held"] - base
    extra = held - (none["held"] - none["model_rss"])
    print(f"  two copies of the changed bytes    {2 * changed / MiB:8.1f} MiB (the target)")
    print(
        f"  the revert bytes add {extra / MiB:.1f} MiB ({extra / changed:.2f}x the changed "
        f"bytes); held over the model {held / changed:.2f}x the changed bytes: "
        f"{'met' if held <= 2 * changed else 'not met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
