"""Helpers for the agent tests: models, snapshots, and hand-made versions.

``commit_raw`` writes a version without the Publisher, for what a correct
publisher never produces (a manifest whose stated norm lies, a head that
moved without a notice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch

from hotswap import codec, keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.manifest import Manifest, TensorEntry
from hotswap.status import AgentStatus
from hotswap.status import decode as decode_status
from hotswap.store import Store

MODEL = "m"


class Ten(torch.nn.Module):
    """Ten tensors: nine parameters and a buffer, float32."""

    scale: torch.Tensor

    def __init__(self, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(4))
        self.head = torch.nn.Linear(width, 2, bias=False)
        self.register_buffer("scale", torch.ones(width))
        with torch.no_grad():
            for t in self.state_dict().values():
                t.copy_(torch.randn(t.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) * self.scale
        out: torch.Tensor = self.head(x)
        return out


def bump(state: Mapping[str, torch.Tensor], delta: float = 0.01) -> dict[str, torch.Tensor]:
    """A plausible next version: every tensor nudged."""
    return {k: v.detach() + delta for k, v in state.items()}


def cloned(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def snapshot(model: torch.nn.Module) -> dict[str, bytes]:
    """Every tensor's raw bytes, to prove nothing changed."""
    return {k: bytes(codec.as_bytes(v)) for k, v in model.state_dict().items()}


def pointers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(data_ptr, id) of every tensor: where the bytes live and which Parameter holds them."""
    return {k: (v.data_ptr(), id(v)) for k, v in model.state_dict(keep_vars=True).items()}


def equal_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    live = model.state_dict()
    return set(live) == set(state) and all(
        bytes(codec.as_bytes(live[k])) == bytes(codec.as_bytes(state[k])) for k in state
    )


def status_of(store: Store, agent: Agent, wait: float = 5.0) -> AgentStatus:
    """The agent's record in Redis, waiting up to ``wait`` s for its first write."""
    deadline = time.monotonic() + wait
    while True:
        for agent_id, raw, _alive in store.agent_records():
            if agent_id == agent.agent_id:
                return decode_status(raw)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no status record for {agent.agent_id}")
        time.sleep(0.02)


def eventually(check: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def entry_for(name: str, t: torch.Tensor, chunk_bytes: int = 64 * 1024) -> TensorEntry:
    buf = codec.as_bytes(t)
    s = codec.stats(t)
    return TensorEntry(
        name,
        codec.dtype_name(t.dtype),
        tuple(t.shape),
        len(buf),
        codec.digest(buf),
        chunk_bytes,
        s.norm,
        s.max_abs,
    )


def commit_raw(
    store: Store,
    state: Mapping[str, torch.Tensor],
    *,
    tamper: Callable[[list[TensorEntry]], list[TensorEntry]] | None = None,
    notify: bool = True,
    signing_key: bytes | None = None,
) -> int:
    """Upload ``state`` and make it head without the Publisher; returns the version.

    ``tamper`` edits the entries before the manifest is built; ``notify=False``
    moves head without a notice, as if the notice were lost.
    """
    entries = [entry_for(k, v) for k, v in state.items()]
    for e in entries:
        store.upload(e, codec.as_bytes(state[e.name]))
    if tamper is not None:
        entries = tamper(entries)
    head = store.head_manifest()
    version = store.reserve_version()
    m = Manifest(
        model=store.model,
        version=version,
        parent=head.version if head else None,
        lineage=head.lineage if head else mf.new_lineage(),
        tensors=tuple(entries),
        created=time.time(),
    )
    data = mf.encode(m, signing_key)
    if notify:
        n = notice.encode(notice.Notice(store.model, version, "publish", m.lineage))
        store.commit(m, data, {"version": version}, n)
    else:
        store.client.set(keys.manifest_key(store.ns, store.model, version), data)
        store.client.set(keys.head_key(store.ns, store.model), version)
    return version


def restate(entries: list[TensorEntry], name: str, **changes: object) -> list[TensorEntry]:
    return [replace(e, **changes) if e.name == name else e for e in entries]  # type: ignore[arg-type]


@contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
