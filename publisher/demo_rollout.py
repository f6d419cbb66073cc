"""``hotswap demo``'s rollout act: two canaries, a valid but bad version, a good one.

Two more example servers start on the canary track (HOTSWAP_TRACK=canary):
``canary-1`` probes every version (``demo_server.OutputsInBounds``: a fixed
batch whose logits may move only so far from the last good version's),
``canary-2`` does not. A version that passes validation but fails that probe
is published without promotion and rolled out (``publisher.rollout``):
canary-1 refuses it before any request sees it, the rollout takes every pin
back, and canary-2, which served it, answers from the previous version again
(reverted from host memory); web-1, on the stable track, never applies it.
A good version then goes through the same rollout and is promoted. Every
claim is checked against the servers' own answers, and the act fails the
demo when one does not hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.markup import escape

from hotswap import status
from hotswap.agentrecords import AgentRecord
from hotswap.errors import FormatError, HotswapError
from publisher.rollout import Rollout

if TYPE_CHECKING:
    from publisher.demo import _Demo, _Server

MAX_DRIFT = 0.1  # canary-1's probe: the fixed batch's logits may move 10% at most
BAD_LAYER, BAD_SCALE = "blocks.1.mlp.", 3.0  # a fine-tune that blew up: valid, and bad
GOOD_LAYER, GOOD_SCALE = "blocks.0.mlp.", 1.02
BAKE = 1.0  # seconds the good version is watched on the canaries before promotion
POLL = 0.02  # seconds between two requests of a watcher (it shares the CPUs with the servers)
# Seconds every server has to run head again after the bad rollout rolled back.
BACK_TIMEOUT = 10.0


@dataclass
class _Watch:
    """Asks one server ``/predict`` over and over on a thread: when each answer came, and
    from which version."""

    server: _Server
    answers: list[tuple[float, int | None]] = field(default_factory=list)
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self.server.predict()["version"]
            except HotswapError as e:
                self.error = str(e)
                return
            self.answers.append((time.monotonic(), version))
            self._stop.wait(POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        if self.error is not None:
            raise HotswapError(f"{self.server.name} stopped answering: {self.error}")

    def count(self, version: int) -> int:
        return sum(1 for _, v in self.answers if v == version)

    def back_after(self, version: int, since: float) -> float | None:
        """Seconds from ``since`` to the first answer not from ``version`` after its last
        one; None when it never answered from ``version``."""
        last = max((t for t, v in self.answers if v == version), default=None)
        if last is None:
            return None
        after = [t for t, v in self.answers if t > last and v != version]
        if not after:
            raise HotswapError(f"{self.server.name} still answers from v{version}")
        return max(0.0, after[0] - since)


def _scaled(weights: Mapping[str, torch.Tensor], prefix: str, by: float) -> dict[str, torch.Tensor]:
    return {k: (v * by if k.startswith(prefix) else v) for k, v in weights.items()}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def act(demo: _Demo, weights: Mapping[str, torch.Tensor], head: int) -> None:
    """Steps 6 to 8 of the demo; ``weights`` are what ``head`` (running everywhere) holds."""
    servers = _start_canaries(demo, head)
    _bad_version(demo, weights, head, servers)
    _good_version(demo, weights, head, servers)


def _start_canaries(demo: _Demo, head: int) -> list[_Server]:
    canary = {"HOTSWAP_TRACK": "canary"}
    started = time.monotonic()
    # Both boot (load torch) at once; then wait for each.
    one = demo.start_server("canary-1", canary, ("--max-drift", str(MAX_DRIFT)))
    two = demo.start_server("canary-2", canary)
    one.listening(), two.listening()
    for server in (one, two):
        server.wait_version(head)
    demo.say(
        f"6. Started two more servers on the canary track (HOTSWAP_TRACK=canary), named "
        f"canary-1 (pid {one.process.pid}) and canary-2 (pid {two.process.pid}) "
        f"(HOTSWAP_AGENT_NAME, a stable id); both run head v{head} after "
        f"{time.monotonic() - started:.1f}s. canary-1 probes each version: a fixed batch of "
        f"8 prompts whose logits may move at most {MAX_DRIFT:.0%} from the last good "
        f"version's. The first server, web-1, is on the stable track."
    )
    return [demo.server, one, two]


def _bad_version(
    demo: _Demo, weights: Mapping[str, torch.Tensor], head: int, servers: list[_Server]
) -> None:
    bad = demo.pub.publish(
        _scaled(weights, BAD_LAYER, BAD_SCALE), message="a fine-tune that blew up", promote=False
    )
    watches = [_Watch(s) for s in servers]
    said: list[tuple[float, str]] = []
    began = time.monotonic()
    try:
        outcome = Rollout(
            demo.pub, bad, canary="1", bake=30, say=lambda t: said.append((time.monotonic(), t))
        ).run()
    finally:
        for w in watches:
            w.stop()
    if outcome.state != "rolled_back" or outcome.reason is None:
        raise HotswapError(f"the rollout of v{bad} ended {outcome.state}, not rolled back")
    decided = next(t for t, text in said if text.startswith("rolling back"))
    why = outcome.reason.partition(f"refused v{bad}: ")[2]
    if not why.startswith("probe outputs_in_bounds"):
        raise HotswapError(f"the rollout of v{bad} rolled back for another reason: {outcome}")
    applied = {s.name: s.get("/applied")["applied"] for s in servers}
    back = watches[2].back_after(bad, decided)
    if bad in applied["web-1"] or bad in applied["canary-1"] or watches[1].count(bad):
        raise HotswapError(f"v{bad} reached a server it should not have: {applied}")
    # A canary still applying v{bad} when its pin was taken back applies it, then
    # follows the pin's end and reverts: wait for that, bounded.
    deadline = time.monotonic() + BACK_TIMEOUT
    while any(s.get("/version")["version"] != head for s in servers):
        if time.monotonic() > deadline:
            raise HotswapError(f"not every server runs v{head} after the rollback")
        time.sleep(0.02)
    demo.say(
        f"7. Published v{bad} with promote=False (hotswap publish --no-promote): {BAD_LAYER}* "
        f"{BAD_SCALE:g} times their size, a fine-tune that blew up, yet finite and within the "
        f"policy's norm ratio, so it passes validation; head stays v{head}. "
        f"Rollout(pub, v{bad}, canary='1') pinned it for both canaries. canary-1 "
        f"[bold red]refused v{bad}[/bold red] ({escape(why)}) and put v{head}'s bytes back "
        f"before any request saw them ({watches[1].count(head)} answers during the rollout, "
        f"none from v{bad}). The rollout rolled back {_ms(decided - began)} after it began; "
        f"canary-2, which had served v{bad} to {watches[2].count(bad)} requests, answered "
        f"from v{head} again {_ms(back or 0.0)} after that decision (from host memory). "
        f"Asked, the servers applied: web-1 {applied['web-1']}, canary-1 "
        f"{applied['canary-1']}, canary-2 {applied['canary-2']}: v{bad} never reached web-1."
    )


def _good_version(
    demo: _Demo, weights: Mapping[str, torch.Tensor], head: int, servers: list[_Server]
) -> None:
    web = servers[0]
    good = demo.pub.publish(
        _scaled(weights, GOOD_LAYER, GOOD_SCALE), message="a careful fine-tune", promote=False
    )
    began = time.monotonic()
    outcome = Rollout(demo.pub, good, canary="1", bake=BAKE).run()
    ran = time.monotonic() - began
    if not outcome.promoted:
        raise HotswapError(f"the rollout of v{good} ended {outcome.state}: {outcome.reason}")
    took, _ = web.wait_version(good)
    for server in servers[1:]:
        server.wait_version(good)
    # The canaries' records say their pins ended once they wrote them again (each
    # settles its changes for a moment): wait for that before status shows them.
    deadline = time.monotonic() + BACK_TIMEOUT
    while any(_pinned(r) for r in demo.pub.store.agent_report().records):
        if time.monotonic() > deadline:
            break  # status then shows the pin the last record still names
        time.sleep(POLL)
    demo.say(
        f"8. Published v{good} with promote=False ({GOOD_LAYER}* times {GOOD_SCALE:g}) and "
        f"rolled it out the same way with a {BAKE:g}s bake: both canaries ran it (canary-1's "
        f"probe passed), nothing failed while it baked, so the rollout made it head "
        f"{ran:.1f}s after it began; web-1 applied v{good} "
        f"{_ms(took)} later."
    )


def _pinned(record: AgentRecord) -> bool:
    """Whether an agent's status record still names a rollout pin."""
    if record.data is None or not record.alive:
        return False
    try:
        return status.decode(record.data).pinned is not None
    except FormatError:
        return False
