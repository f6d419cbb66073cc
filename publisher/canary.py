"""What a rollout decides from what agents report: who is a canary, and whether they are well.

Pure: reads no Redis. ``members`` picks the agents a step pins (the canary
track's agents first, then live agents in an order fixed by the version and
their ids, so a rerun or a resumed rollout picks the same ones); ``judge``
looks at the members' status records and says whether the step failed (a
member rejected the version, failed a probe, lost its heartbeat, crossed a
health limit too often, or did not apply it in time) or runs the version
everywhere it should.

Example:
    >>> steps("10%", ["50%"])
    ['10%', '50%', '100%']
    >>> size("10%", 25), size("3", 25), size("100%", 25)
    (3, 3, 25)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import blake3

from hotswap import status
from hotswap.errors import ConfigError
from hotswap.rollouts import Record
from hotswap.status import AgentStatus


def _check_step(text: str) -> str:
    body = text.strip()
    number = body[:-1] if body.endswith("%") else body
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    percent = body.endswith("%")
    ok = 0 < value <= 100 if percent else number.isdigit() and int(number) >= 1
    if not ok:
        raise ConfigError(
            f"rollout step {text!r}: write a share of live agents (10%) or a count (3)"
        )
    return body


def steps(canary: str, widen: Iterable[str] = ()) -> list[str]:
    """The steps of a rollout: the canary, then each widening, ending at ``100%``."""
    out = [_check_step(canary), *(_check_step(s) for s in widen)]
    if out[-1] != "100%":
        out.append("100%")
    return out


def size(step: str, live: int) -> int:
    """How many agents a step reaches among ``live`` ones (at least one, at most all)."""
    share = step.endswith("%")
    wanted = math.ceil(float(step[:-1]) / 100 * live - 1e-9) if share else int(step)
    return max(1, min(live, wanted))


def order(model: str, version: int, agent_ids: Iterable[str]) -> list[str]:
    """``agent_ids`` in the order steps take them: fixed by the version and the ids."""

    def rank(agent_id: str) -> str:
        return blake3.blake3(f"{model}:{version}:{agent_id}".encode()).hexdigest()

    return sorted(agent_ids, key=rank)


@dataclass(frozen=True)
class Seen:
    """One agent as the rollout sees it: its record (None if unreadable) and heartbeat."""

    agent_id: str
    status: AgentStatus | None
    alive: bool

    @property
    def live(self) -> bool:
        return self.status is not None and status.live(self.status, self.alive)


def members(record: Record, fleet: Sequence[Seen]) -> list[str]:
    """The agents the current step pins: those pinned so far, every live agent of the
    canary track, then live agents in ``order`` up to the step's size."""
    live = [s for s in fleet if s.live]
    chosen = list(dict.fromkeys(record.members))
    for s in live:
        if s.status is not None and s.status.track == record.track and s.agent_id not in chosen:
            chosen.append(s.agent_id)
    wanted = size(record.steps[record.step], len(live))
    for agent_id in order(record.model, record.version, (s.agent_id for s in live)):
        if len(chosen) >= wanted:
            break
        if agent_id not in chosen:
            chosen.append(agent_id)
    return chosen


@dataclass
class Strikes:
    """Health samples over a limit, by agent and limit: counted once per sample."""

    counted: dict[tuple[str, str], float] = field(default_factory=dict)
    count: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, agent_id: str, name: str, at: float) -> int:
        key = (agent_id, name)
        if self.counted.get(key) != at:
            self.counted[key] = at
            self.count[key] = self.count.get(key, 0) + 1
        return self.count[key]


@dataclass(frozen=True)
class Verdict:
    """A step's state: ``failed`` says why it must roll back; ``ready`` that every member
    runs the version; ``waiting`` names the members that do not yet."""

    failed: str | None
    ready: bool
    waiting: tuple[str, ...] = ()


def judge(record: Record, fleet: Sequence[Seen], strikes: Strikes, now: float) -> Verdict:
    """Whether the step's members are well (see the module docstring)."""
    by_id = {s.agent_id: s for s in fleet}
    waiting = []
    v = record.version
    for agent_id in record.members:
        seen = by_id.get(agent_id)
        st = None if seen is None else seen.status
        if st is not None and v in status.rejected(st):
            why = "; ".join(r for rs in st.rejection.values() for r in rs)[:200]
            if st.rejected_version != v or not why:
                why = st.last_error or "no reason recorded"
            return Verdict(f"canary {agent_id} refused v{v}: {why}", False)
        if seen is None or not seen.live:
            return Verdict(
                f"canary {agent_id} is gone (no heartbeat, stopped or unreadable)", False
            )
        assert st is not None
        if st.version != v:
            waiting.append(agent_id)
            continue
        for limit in record.limit_list():
            number = (st.health or {}).get(limit.name)
            if number is None or not limit.crossed(number):
                continue
            count = strikes.add(agent_id, limit.name, st.health_at or st.updated)
            if count > record.failure_limit:
                return Verdict(
                    f"canary {agent_id} reports {limit.name}={number:g}, outside {limit}", False
                )
    if waiting and record.step_started is not None:
        late = now - record.step_started
        if late > record.apply_timeout:
            names = ", ".join(waiting[:5])
            return Verdict(
                f"{len(waiting)} canaries did not run v{v} within {record.apply_timeout:g}s "
                f"({names})",
                False,
            )
    return Verdict(None, not waiting, tuple(waiting))
