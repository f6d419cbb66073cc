"""Helpers for the agent tests: models, snapshots, hand-made versions, and waits.

``commit_raw`` writes a version without the Publisher, for what a correct
publisher never produces (a manifest whose stated norm lies, a head that
moved without a notice). ``Watch`` sees what an agent asks of Redis (through
``Agent(store_factory=...)``), so tests wait for those calls and count them
instead of sleeping; ``until`` waits for the agent's own state, asked again
after every step its thread takes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import tenacity
import torch

from hotswap import codec, headrecord, keys, notice
from hotswap import manifest as mf
from hotswap.agent import Agent
from hotswap.blobs import BlobStore
from hotswap.connection import RedisClient
from hotswap.manifest import Manifest, TensorEntry
from hotswap.pins import Following
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


class Watch:
    """What agents asked of Redis, in order, for tests to wait on instead of sleeping.

    ``factory`` is an ``Agent(store_factory=...)``: the stores it builds note
    here every read of head and of a manifest and every blob read (``calls``),
    every connection attempt (``pings``), and every status record that landed
    (``written``; the writing thread in ``status_threads``).
    ``before_read(entry)``, when set, runs before each blob read: to fail it,
    hold it, or kill the server under it.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.calls: list[tuple[str, Any]] = []
        self.pings = 0
        self.written: list[AgentStatus] = []
        self.status_threads: list[str] = []
        self.before_read: Callable[[TensorEntry], None] | None = None

    def factory(
        self,
        client: RedisClient,
        model: str,
        settings: HotswapSettings,
        retrying: tenacity.Retrying,
    ) -> Store:
        store = cast(WatchedStore, WatchedStore.from_settings(client, model, settings, retrying))
        blobs = WatchedBlobs(client, store.model, namespace=store.ns, retrying=retrying)
        store.watch = blobs.watch = self
        store.blobs = blobs
        return store

    def saw(self, kind: str, version: int | None = None) -> None:
        with self.changed:
            if kind == "ping":
                self.pings += 1
            else:
                self.calls.append((kind, version))
            self.changed.notify_all()

    def wrote(self, record: AgentStatus) -> None:
        with self.changed:
            self.written.append(record)
            self.changed.notify_all()

    def wait(self, check: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Whether ``check()`` held within ``timeout`` s, asked again after every call noted."""
        with self.changed:
            return self.changed.wait_for(check, timeout)

    def count(self, kind: str) -> int:
        """How many calls of ``kind`` ("head", "manifest", "read") were noted."""
        with self.changed:
            return sum(1 for seen, _ in self.calls if seen == kind)


class WatchedStore(Store):
    """A Store that tells its ``Watch`` what the agent asks of Redis."""

    watch: Watch

    def ping(self) -> None:
        self.watch.saw("ping")
        super().ping()

    def head(self) -> int | None:
        self.watch.saw("head")
        return super().head()

    def following(self, agent_id: str, track: str = "stable") -> Following:
        self.watch.saw("head")
        return super().following(agent_id, track)

    def head_and_record(self) -> tuple[int | None, bytes | None]:
        self.watch.saw("head")
        return super().head_and_record()

    def head_and_glance(
        self, version: int, edge: int
    ) -> tuple[int | None, tuple[int, bytes, bytes]]:
        self.watch.saw("head")
        return super().head_and_glance(version, edge)

    def manifest_bytes(self, version: int) -> bytes:
        self.watch.saw("manifest", version)
        return super().manifest_bytes(version)

    def write_agent_status(self, agent_id: str, record: bytes, ttl: float) -> None:
        self.watch.status_threads.append(threading.current_thread().name)
        super().write_agent_status(agent_id, record, ttl)
        self.watch.wrote(decode_status(record))


class WatchedBlobs(BlobStore):
    """Blob reads noted in the ``Watch``, after its ``before_read`` hook."""

    watch: Watch

    def read_into(
        self,
        entry: TensorEntry,
        out: memoryview,
        version: int | None = None,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        self.watch.saw("read", version)
        if self.watch.before_read is not None:
            self.watch.before_read(entry)
        super().read_into(entry, out, version, on_chunk)


def watch_of(agent: Agent) -> Watch:
    """The ``Watch`` an agent was built with (``watched_agent``, ``recorded_agent``)."""
    assert isinstance(agent.store, WatchedStore), "build the agent with a Watch's factory"
    return agent.store.watch


def watched_agent(model: Any, settings: HotswapSettings, **kwargs: Any) -> tuple[Agent, Watch]:
    """An agent (not started) whose Redis calls a fresh ``Watch`` sees."""
    watch = Watch()
    return Agent(model, MODEL, settings=settings, store_factory=watch.factory, **kwargs), watch


def until(agent: Agent, check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check()`` held within ``timeout`` s, asked again after every step the
    agent's thread takes (a notice or poll handled, a failure, an apply)."""
    return agent._pipeline.state.wait_until(check, timeout)


def status_of(
    store: Store,
    agent: Agent,
    check: Callable[[AgentStatus], bool] = lambda _s: True,
    timeout: float = 10.0,
) -> AgentStatus:
    """The agent's record in Redis, once a record that passes ``check`` has landed there."""
    watch = watch_of(agent)
    if not watch.wait(lambda: any(check(s) for s in watch.written), timeout):
        raise AssertionError(f"no status record as expected for {agent.agent_id}")
    for agent_id, raw, _alive in store.agent_records():
        if agent_id == agent.agent_id:
            return decode_status(raw)
    raise AssertionError(f"no status record for {agent.agent_id}")


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
    With ``signing_key``, the signed head record names the new version too.
    """
    version = store.reserve_version()
    m, data = manifest_raw(store, state, version, tamper=tamper, signing_key=signing_key)
    record = None if signing_key is None else head_record(m, data, signing_key)
    if notify:
        n = notice.encode(notice.Notice(store.model, version, "publish", m.lineage))
        store.commit(m, data, {"version": version}, n, record)
    else:
        if record is not None:
            store.client.set(keys.head_record_key(store.ns, store.model), record)
        store.client.set(keys.manifest_key(store.ns, store.model, version), data)
        store.client.set(keys.head_key(store.ns, store.model), version)
    return version


def sign_head(
    store: Store,
    m: Manifest,
    data: bytes,
    signing_key: bytes,
    *,
    issued: float | None = None,
    expires: float | None = None,
) -> bytes:
    """Write the signed head record naming ``m`` (wire bytes ``data``), as a publisher
    with a signing key does (``hotswap resign`` with ``issued``); returns its bytes."""
    raw = head_record(m, data, signing_key, issued=issued, expires=expires)
    store.client.set(keys.head_record_key(store.ns, store.model), raw)
    return raw


def head_record(
    m: Manifest,
    data: bytes,
    signing_key: bytes,
    *,
    issued: float | None = None,
    expires: float | None = None,
) -> bytes:
    """The signed head record naming ``m`` (wire bytes ``data``), issued at its creation."""
    record = headrecord.HeadRecord(
        m.model,
        m.version,
        m.lineage,
        codec.digest(data),
        issued=m.created if issued is None else issued,
        expires=expires,
    )
    return headrecord.encode(record, signing_key)


def announce(store: Store, version: int, lineage: str, carried: bytes | None = None) -> None:
    """Publish a notice for ``version`` (carrying ``carried``), as anyone with PUBLISH can."""
    n = notice.Notice(store.model, version, "publish", lineage, carried)
    store.client.publish(keys.events_channel(store.ns, store.model), notice.encode(n))


def recorded_agent(settings: HotswapSettings, **kwargs: Any) -> tuple[Ten, Agent, Watch]:
    """A model and its watched agent; no poll gets between a notice and the reads it makes."""
    model = Ten()
    slow = settings.model_copy(update={"poll_interval": 30.0})
    agent, watch = watched_agent(model, slow, **kwargs)
    return model, agent, watch


def restate(entries: list[TensorEntry], name: str, **changes: object) -> list[TensorEntry]:
    return [replace(e, **changes) if e.name == name else e for e in entries]  # type: ignore[arg-type]


@contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
