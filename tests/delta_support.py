"""Hand-made delta versions for the reconstruct and agent tests, and a Watch that sees frames.

``Versions`` commits versions as a delta-writing publisher would (each
changed tensor a delta from its parent's bytes, full blobs where asked or
where no delta is possible), and lets a test say per tensor how it is stored:
``"full"``, ``"delta"``, ``"keyframe"`` (both) or ``"back"`` (the parent's own
delta read backwards: a step undone). Blobs are written straight to their
keys, so a test can then corrupt or delete exactly one of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import tenacity
import torch
from agent_support import Watch, WatchedBlobs, WatchedStore, entry_for

from hotswap import codec, delta, keys, notice
from hotswap import manifest as mf
from hotswap.connection import RedisClient
from hotswap.entries import DeltaRef
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
from hotswap.store import Store

CHUNK = 4096


def entry_of(name: str, t: torch.Tensor, chunk_bytes: int = CHUNK) -> TensorEntry:
    """``agent_support.entry_for`` with this module's small chunks."""
    return entry_for(name, t, chunk_bytes)


def chunk_digests(data: memoryview, chunk_bytes: int) -> list[bytes]:
    return [delta.chunk_digest(data[s : s + chunk_bytes]) for s in range(0, len(data), chunk_bytes)]


def nudged(t: torch.Tensor, seed: int, count: int = 3) -> torch.Tensor:
    """``t`` with ``count`` elements changed: a sparse step, as an RL update makes."""
    g = torch.Generator().manual_seed(seed)
    out = t.detach().clone()
    flat = out.view(-1)
    at = torch.randint(0, flat.numel(), (count,), generator=g)
    flat[at] += torch.randn(count, generator=g, dtype=torch.float32).to(out.dtype)
    return out


class Versions:
    """Versions of one model committed by hand, their states and manifests kept.

    Args:
        store: the model's store.
        chunk_bytes: the chunk size of every entry (small: several frames a tensor).
    """

    def __init__(self, store: Store, chunk_bytes: int = CHUNK) -> None:
        self.store = store
        self.chunk = chunk_bytes
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.manifests: dict[int, Manifest] = {}
        self.frames: dict[tuple[int, str], list[bytes]] = {}

    def commit(
        self,
        state: Mapping[str, torch.Tensor],
        how: Mapping[str, str] | None = None,
        *,
        default: str = "delta",
        rollback_to: int | None = None,
        notify: bool = True,
    ) -> int:
        """Store ``state`` as the next version on head; returns its number.

        ``how`` names how each tensor is stored (else ``default``); a delta
        falls back to a full blob where the parent has no such tensor, the
        same bytes, or ``delta.encode`` finds it not worth it.
        """
        store = self.store
        version = store.reserve_version()
        head = store.head_manifest()
        parents = head.by_name() if head else {}
        entries = []
        for name, t in state.items():
            e = entry_of(name, t, self.chunk)
            kind = (how or {}).get(name, default)
            parent = parents.get(name)
            if kind != "full" and parent is not None and parent.digest != e.digest and head:
                e = self._as_delta(version, e, t, parent, head.version, kind)
            if e.delta is None or e.delta.keyframe:
                self._write(
                    e.digest,
                    [
                        bytes(codec.as_bytes(t)[s : s + self.chunk])
                        for s in range(0, e.nbytes, self.chunk)
                    ],
                )
            entries.append(e)
        m = Manifest(
            model=store.model,
            version=version,
            parent=head.version if head else None,
            lineage=head.lineage if head else mf.new_lineage(),
            tensors=tuple(entries),
            kind="publish" if rollback_to is None else "rollback",
            rollback_to=rollback_to,
            created=time.time(),
        )
        data = mf.encode(m)
        n = notice.encode(notice.Notice(store.model, version, m.kind, m.lineage))
        if notify:
            store.commit(m, data, {"version": version}, n)
        else:
            store.client.set(keys.manifest_key(store.ns, store.model, version), data)
            store.client.set(keys.head_key(store.ns, store.model), version)
        self.states[version] = {k: v.detach().clone() for k, v in state.items()}
        self.manifests[version] = m
        return version

    def rollback(self, to: int) -> int:
        """Commit a rollback to ``to`` as a publisher does: ``to``'s entries, as they are."""
        store = self.store
        version = store.reserve_version()
        head = store.head_manifest()
        assert head is not None
        m = mf.derive(
            self.manifests[to],
            version=version,
            parent=head.version,
            kind="rollback",
            rollback_to=to,
            created=time.time(),
        )
        n = notice.encode(notice.Notice(store.model, version, m.kind, m.lineage))
        store.commit(m, mf.encode(m), {"version": version}, n)
        self.states[version] = self.states[to]
        self.manifests[version] = m
        return version

    def _as_delta(
        self,
        version: int,
        e: TensorEntry,
        t: torch.Tensor,
        parent: TensorEntry,
        parent_version: int,
        kind: str,
    ) -> TensorEntry:
        new = codec.as_bytes(t)
        if kind == "back":
            ref = parent.delta
            assert ref is not None and ref.base == e.digest, (
                "back: the parent must be a delta from this content"
            )
            depth = ref.depth + 1
            back = DeltaRef(
                ref.encodings,
                parent.digest,
                ref.blob,
                ref.stored_bytes,
                delta.frames_digest(chunk_digests(new, self.chunk)),
                False,
                depth,
                ref.chain_bytes + ref.stored_bytes,
            )
            return replace(e, delta=back)
        base = codec.as_bytes(self.states[parent_version][e.name])
        frames = delta.encode(new, base, self.chunk, itemsize=t.element_size())
        if frames is None:
            return e
        stored = sum(map(len, frames))
        starts_chain = parent.delta is None or parent.delta.keyframe
        depth = 1 if starts_chain or parent.delta is None else parent.delta.depth + 1
        chain_bytes = (
            stored if starts_chain or parent.delta is None else parent.delta.chain_bytes + stored
        )
        ref = DeltaRef(
            tuple(sorted(x.wire_name for x in delta.encodings_used(frames))),
            parent.digest,
            delta.blob_name(parent.digest, e.digest, self.chunk),
            stored,
            delta.frames_digest(delta.result_digests(frames)),
            kind == "keyframe",
            depth,
            chain_bytes,
        )
        self._write(ref.blob, frames)
        self.frames[(version, e.name)] = frames
        return replace(e, delta=ref)

    def _write(self, blob: str, chunks: list[bytes]) -> None:
        names = keys.chunk_keys(self.store.ns, self.store.model, blob, self.chunk, len(chunks))
        pipe = self.store.client.pipeline(transaction=False)
        for name, chunk in zip(names, chunks, strict=True):
            pipe.set(name, chunk)
        pipe.execute()

    def entry(self, version: int, name: str) -> TensorEntry:
        return self.manifests[version].by_name()[name]

    def frame_key(self, version: int, name: str, i: int) -> str:
        """The key of frame ``i`` of the delta blob ``name``'s entry of ``version`` names."""
        e = self.entry(version, name)
        assert e.delta is not None
        return keys.blob_key(self.store.ns, self.store.model, e.delta.blob, e.chunk_bytes, i)

    def full_keys(self, version: int, name: str) -> list[str]:
        e = self.entry(version, name)
        return keys.chunk_keys(self.store.ns, self.store.model, e.digest, e.chunk_bytes, e.chunks)


class FrameWatch(Watch):
    """A ``Watch`` whose blob stores also note each delta blob read (``"frames"``)
    and the bytes its frames took (``frame_bytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.frame_bytes = 0

    def factory(
        self,
        client: RedisClient,
        model: str,
        settings: HotswapSettings,
        retrying: tenacity.Retrying,
    ) -> Store:
        store = super().factory(client, model, settings, retrying)
        assert isinstance(store, WatchedStore)
        blobs = FramedBlobs(client, store.model, namespace=store.ns, retrying=retrying)
        blobs.watch = self
        store.blobs = blobs
        return store


class FramedBlobs(WatchedBlobs):
    watch: Watch

    def frames(self, entry: TensorEntry, version: int | None = None) -> Iterator[memoryview]:
        self.watch.saw("frames", version)
        for frame in super().frames(entry, version):
            if isinstance(self.watch, FrameWatch):
                self.watch.frame_bytes += len(frame)
            yield frame


def flip(client: Any, key: str, at: int = -1) -> None:
    """Flip one byte of a stored value (a bit rot in Redis)."""
    raw = bytearray(client.get(key))
    raw[at] ^= 0xFF
    client.set(key, bytes(raw))


def same_bytes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(
        bytes(codec.as_bytes(a[k])) == bytes(codec.as_bytes(b[k])) for k in a
    )
