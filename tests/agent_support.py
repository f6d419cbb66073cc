"""Helpers for the agent tests: models, snapshots, and hand-made versions.

``commit_raw`` writes a version without the Publisher, for what a correct
publisher never produces (a manifest whose stated norm lies, a head that
moved without a notice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from hotswap import codec, keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
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


def manifest_raw(
    store: Store,
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    tamper: Callable[[list[TensorEntry]], list[TensorEntry]] | None = None,
    signing_key: bytes | None = None,
) -> tuple[Manifest, bytes]:
    """Upload ``state``'s blobs and build (not store) the manifest of ``version`` on head.

    ``tamper`` edits the entries before the manifest is built.
    """
    entries = [entry_for(k, v) for k, v in state.items()]
    for e in entries:
        store.blobs.upload(e, codec.as_bytes(state[e.name]))
    if tamper is not None:
        entries = tamper(entries)
    head = store.head_manifest()
    m = Manifest(
        model=store.model,
        version=version,
        parent=head.version if head else None,
        lineage=head.lineage if head else mf.new_lineage(),
        tensors=tuple(entries),
        created=time.time(),
    )
    return m, mf.encode(m, signing_key)


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
    moves head without a notice, as if the notice were lost. The notice
    carries no manifest, as a publisher's does when the manifest is large.
    """
    version = store.reserve_version()
    m, data = manifest_raw(store, state, version, tamper=tamper, signing_key=signing_key)
    if notify:
        n = notice.encode(notice.Notice(store.model, version, "publish", m.lineage))
        store.commit(m, data, {"version": version}, n)
    else:
        store.client.set(keys.manifest_key(store.ns, store.model, version), data)
        store.client.set(keys.head_key(store.ns, store.model), version)
    return version


def announce(store: Store, version: int, lineage: str, carried: bytes | None = None) -> None:
    """Publish a notice for ``version`` (carrying ``carried``), as anyone with PUBLISH can."""
    n = notice.Notice(store.model, version, "publish", lineage, carried)
    store.client.publish(keys.events_channel(store.ns, store.model), notice.encode(n))


class Recorder:
    """Wraps an agent's store reads to record which thread read what, in order."""

    def __init__(self, agent: Agent) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.status_threads: list[str] = []
        store, once = agent.store, agent.reporter.store
        head, manifest, read = store.head, store.manifest_bytes, store.blobs.read_into
        write = once.write_agent_status

        def rec_head() -> int | None:
            self.calls.append(("head", None))
            return head()

        def rec_manifest(version: int) -> bytes:
            self.calls.append(("manifest", version))
            return manifest(version)

        def rec_read(
            entry: Any, out: memoryview, version: int | None = None, on_chunk: Any = None
        ) -> None:
            self.calls.append(("read", version))
            read(entry, out, version, on_chunk)

        def rec_write(agent_id: str, record: bytes, ttl: float) -> None:
            self.status_threads.append(threading.current_thread().name)
            write(agent_id, record, ttl)

        store.head = rec_head  # type: ignore[method-assign]
        store.manifest_bytes = rec_manifest  # type: ignore[method-assign]
        store.blobs.read_into = rec_read  # type: ignore[method-assign]
        once.write_agent_status = rec_write  # type: ignore[method-assign]


def recorded_agent(settings: HotswapSettings, **kwargs: Any) -> tuple[Ten, Agent, Recorder]:
    """A model and its agent whose reads are recorded; no poll gets between a notice and them."""
    model = Ten()
    slow = settings.model_copy(update={"poll_interval": 30.0})
    agent = Agent(model, MODEL, settings=slow, **kwargs)
    return model, agent, Recorder(agent)


def restate(entries: list[TensorEntry], name: str, **changes: object) -> list[TensorEntry]:
    return [replace(e, **changes) if e.name == name else e for e in entries]  # type: ignore[arg-type]


@contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
