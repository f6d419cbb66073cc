"""A notice flood against a serving process, with and without an agent.

    python -m bench.flood [--seconds 15] [--publish-at 3] [--runs 2] [--quick] [--json PATH]

Three processes besides Redis (a throwaway redis-server): a flooder, one
client PUBLISHing garbage to the model's channel as fast as it can (RESP
commands written straight to its socket, replies read and dropped by a second
thread); a serving process, a small model's forward loop inside
``agent.reading()`` (one torch thread), counting passes; and this one, which
publishes a new version ``--publish-at`` seconds into each run.

Each round runs four cases of ``--seconds`` each: quiet and flooded, each
without and with an agent in the serving process (the flood's own CPU costs
the serving loop the same in both); ``--quick`` runs the two flooded ones.
Reported: forward passes per second (mean, worst one-second window, longest
pass), the serving process's CPU (its passes per CPU second fall only if the
agent's threads take CPU from the loop; its passes per second fall too when
others take the machine's), and, with an agent, the time from the publish's
commit to the agent's apply. The targets of issue 13: under
the flood, the agent's loop keeps at least 80% of the passes of the loop
without one, and applies the version within 2 s of its publish.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from bench.stats import table
from hotswap import Agent, ApplyReport, HotswapSettings, keys
from hotswap.embedded import EmbeddedRedis
from publisher import Publisher

MODEL = "bench-flood"
WIDTH, BLOCKS, BATCH = 256, 6, 16
KEEP_RATIO = 0.8
APPLY_WITHIN = 2.0
FLOOD_CHUNK = 1000


# -- the model ---------------------------------------------------------------------


def build(seed: int = 0) -> torch.nn.Sequential:
    """A small MLP stack (about 12 MiB of float32), the same bytes for a seed in any process."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(BLOCKS):
        layers += [
            torch.nn.Linear(WIDTH, 4 * WIDTH),
            torch.nn.GELU(),
            torch.nn.Linear(4 * WIDTH, WIDTH),
            torch.nn.LayerNorm(WIDTH),
        ]
    return torch.nn.Sequential(*layers)


def nudged(net: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Version ``step`` of the weights: every tensor moved a little, never back."""
    return {k: v.detach() + 1e-3 * step for k, v in net.state_dict().items()}


def settings_for(url: str) -> HotswapSettings:
    return HotswapSettings(redis_url=url, _env_file=None)  # type: ignore[call-arg]


# -- the flooder (its own process) ----------------------------------------------------


def flood(url: str, channel: str, seconds: float) -> None:
    """PUBLISH one garbage byte to ``channel`` as fast as one client can, for ``seconds``."""
    where = urlparse(url)
    sock = socket.create_connection((where.hostname or "127.0.0.1", where.port or 6379))
    name = channel.encode()
    command = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$1\r\n\xc1\r\n" % (len(name), name)
    chunk = command * FLOOD_CHUNK

    def drain() -> None:
        # Replies must be read, or Redis would buffer them for us without end.
        while sock.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        sock.sendall(chunk)
        sent += FLOOD_CHUNK
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


# -- the serving process --------------------------------------------------------------


def serve(url: str, with_agent: bool, head: int, seconds: float) -> None:
    """Forward passes for ``seconds`` from the ``GO <t0>`` line on stdin; prints a JSON result."""
    torch.set_num_threads(1)
    net = build()
    x = torch.randn(BATCH, WIDTH)
    applied: dict[int, float] = {}

    def on_applied(version: int, _report: ApplyReport) -> None:
        applied.setdefault(version, time.monotonic())

    agent = None
    if with_agent:
        agent = Agent(net, MODEL, settings=settings_for(url), on_applied=on_applied)
        agent.start()
        if not agent.wait_for(head, 120):
            raise SystemExit(f"the agent did not apply v{head}")
    with torch.no_grad():
        for _ in range(20):  # warm-up
            net(x)
    print("READY", flush=True)
    t0 = float(sys.stdin.readline().split()[1])
    while time.monotonic() < t0:
        time.sleep(0.001)
    passes: list[float] = []
    cpu = time.process_time()
    with torch.no_grad():
        while (now := time.monotonic()) < t0 + seconds:
            if agent is not None:
                with agent.reading():
                    net(x)
            else:
                net(x)
            passes.append(time.monotonic() - now)
    cpu = time.process_time() - cpu
    if agent is not None:
        agent.stop()
    result = {"passes": passes, "applied": applied, "cpu": cpu}
    print(json.dumps(result), flush=True)


# -- one case, from this process ------------------------------------------------------


@dataclass
class Case:
    """One run: the serving loop's passes (and the flood, the publish, the apply)."""

    agent: bool
    flooded: bool
    seconds: float
    passes: list[float] = field(default_factory=list)
    notices: int = 0
    cpu: float = 0.0
    published: float = 0.0
    applied: float | None = None

    @property
    def rate(self) -> float:
        return len(self.passes) / self.seconds

    @property
    def worst_second(self) -> int:
        """Passes in the slowest whole second."""
        counts = [0] * int(self.seconds)
        at = 0.0
        for p in self.passes:
            at += p
            if int(at) < len(counts):
                counts[int(at)] += 1
        return min(counts) if counts else 0

    @property
    def latency(self) -> float | None:
        return None if self.applied is None else self.applied - self.published


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.flood", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def run_case(
    pub: Publisher, url: str, case: Case, publish_at: float, step: int, net: torch.nn.Module
) -> Case:
    head = pub.store.head() or 0
    server = child("serve", url, "1" if case.agent else "0", str(head), str(case.seconds))
    assert server.stdin is not None and server.stdout is not None
    if server.stdout.readline().strip() != "READY":
        raise SystemExit("the serving process did not start")
    flooder = None
    if case.flooded:
        channel = keys.events_channel(pub.settings.namespace, MODEL)
        flooder = child("flood", url, channel, str(case.seconds + 1))
    t0 = time.monotonic() + 0.5
    server.stdin.write(f"GO {t0}\n")
    server.stdin.flush()
    time.sleep(max(0.0, t0 + publish_at - time.monotonic()))
    version = pub.publish(nudged(net, step))
    case.published = time.monotonic()
    result = json.loads(server.stdout.readline())
    server.wait()
    case.passes, case.cpu = result["passes"], result["cpu"]
    applied = result["applied"].get(str(version))
    case.applied = None if applied is None else float(applied)
    if flooder is not None:
        assert flooder.stdout is not None
        flooded = json.loads(flooder.stdout.readline())
        flooder.wait()
        case.notices = round(flooded["sent"] / flooded["seconds"])
    return case


# -- the report -----------------------------------------------------------------------


def label(case: Case) -> str:
    return f"{'flood' if case.flooded else 'quiet'}, {'agent' if case.agent else 'no agent'}"


def report(cases: list[Case]) -> str:
    rows = []
    for c in cases:
        latency = "-" if not c.agent else "never" if c.latency is None else f"{c.latency:.2f}"
        rows.append(
            [
                label(c),
                f"{c.notices:,}" if c.flooded else "-",
                f"{c.rate:.1f}",
                c.worst_second,
                f"{max(c.passes, default=0.0) * 1000:.0f}",
                f"{c.cpu / c.seconds:.2f}",
                f"{len(c.passes) / c.cpu:.0f}" if c.cpu else "-",
                latency,
            ]
        )
    header = [
        "case",
        "flood notices/s",
        "passes/s",
        "worst second",
        "longest pass ms",
        "serving CPU cores",
        "passes per CPU s",
        "publish→applied s",
    ]
    lines = [table(header, rows), ""]

    def rate(flooded: bool, agent: bool) -> float:
        return statistics.median(
            [c.rate for c in cases if c.flooded == flooded and c.agent == agent] or [float("nan")]
        )

    kept = rate(True, True) / rate(True, False)
    latencies = [c.latency for c in cases if c.agent and c.flooded]
    worst = max((t if t is not None else float("inf")) for t in latencies) if latencies else 0.0
    lines.append(
        f"under the flood, the loop with an agent keeps **{kept:.0%}** of the passes "
        f"of the loop without one ({'within' if kept >= KEEP_RATIO else 'OVER'} the "
        f"{KEEP_RATIO:.0%} target)"
    )
    lines.append(
        f"publish→applied under the flood, worst of {len(latencies)}: **{worst:.2f} s** "
        f"({'within' if worst <= APPLY_WITHIN else 'OVER'} the {APPLY_WITHIN:.0f} s target)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["flood"]:
        flood(args[1], args[2], float(args[3]))
        return 0
    if args[:1] == ["serve"]:
        serve(args[1], args[2] == "1", int(args[3]), float(args[4]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each case")
    parser.add_argument("--publish-at", type=float, default=3.0, help="publish this far in")
    parser.add_argument("--runs", type=int, default=2, help="rounds of the four cases")
    parser.add_argument(
        "--quick", action="store_true", help="the two flooded cases only, 2 s each, one round"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    opts = parser.parse_args(args)
    if opts.quick:
        opts.seconds, opts.publish_at, opts.runs = 2.0, 0.5, 1
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    net = build()
    cases: list[Case] = []
    conditions = [(True,)] if opts.quick else [(False,), (True,)]
    with EmbeddedRedis() as server, Publisher(MODEL, settings=settings_for(server.url)) as pub:
        pub.publish(nudged(net, 0))
        for round_ in range(opts.runs):
            for (flooded,) in conditions:
                # Alternate which goes first: drift on a shared machine hits both.
                for agent in (False, True) if round_ % 2 == 0 else (True, False):
                    case = Case(agent, flooded, opts.seconds)
                    run_case(pub, server.url, case, opts.publish_at, len(cases) + 1, net)
                    print(f"{label(case)}: {case.rate:.1f} passes/s", flush=True)
                    cases.append(case)
    print()
    print(
        f"## Notice flood, {opts.seconds:g} s cases, a version published "
        f"{opts.publish_at:g} s in, {opts.runs} round(s)\n"
    )
    print(report(cases))
    if opts.json is not None:
        opts.json.write_text(json.dumps([asdict(c) for c in cases]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
