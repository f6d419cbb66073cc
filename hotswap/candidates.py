"""What can reach a tensor's content: the stored blobs a version and its history name.

An entry's bytes are stored as a full blob, a delta from another content
(``DeltaRef``), or both (a keyframe). ``Candidates`` turns entries into what
``chain.plan_route`` plans over, keeping only blobs a reader can use (same
dtype and shape, frames cut as the target's, encodings this hotswap knows, a
blob named from its two contents), and leaves out the ones found broken.
``History`` reads a version's older manifests along ``parent``, each once
and never past a bound the caller gives.

Imports no Redis: older manifests come through the ``Manifests`` passed in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hotswap import chain, delta, encodings
from hotswap.errors import FormatError, IntegrityError, NotFound
from hotswap.manifest import Manifest, TensorEntry


class Manifests(Protocol):
    """Where older manifests come from (``Store``)."""

    def manifest(self, version: int) -> Manifest:
        """Version ``version``'s manifest; NotFound once collected."""


def unknown_encoding(entry: TensorEntry, where: str) -> str | None:
    """Why this hotswap cannot decode ``entry``'s delta (an encoding it does not know), or None."""
    for name in entry.delta.encodings if entry.delta is not None else ():
        try:
            encodings.encoding_from_name(name)
        except FormatError:
            return (
                f"{where} tensor {entry.name!r} uses delta encoding {name!r:.40}, which this "
                "agent does not know; upgrade hotswap"
            )
    return None


def understood() -> list[str]:
    """The delta encodings this hotswap decodes, by wire name (what an agent reports)."""
    return sorted(e.wire_name for e in encodings.Encoding)


def full_stored(entry: TensorEntry) -> bool:
    """Whether the entry's full blob is stored (no delta, or a keyframe)."""
    return entry.delta is None or entry.delta.keyframe


def reads_backwards(entry: TensorEntry) -> bool | None:
    """Whether the entry's delta blob holds frames from its content to its base (a blob
    shared with the version it came from), False for base to content, None: neither name."""
    ref = entry.delta
    if ref is None:
        return None
    if ref.blob == delta.blob_name(ref.base, entry.digest, entry.chunk_bytes):
        return False
    if ref.blob == delta.blob_name(entry.digest, ref.base, entry.chunk_bytes):
        return True
    return None


@dataclass(frozen=True)
class Source:
    """A stored blob and the entry (of ``version``) that names it: what to read, and how."""

    entry: TensorEntry
    version: int


@dataclass
class Candidates:
    """The stored blobs that may lead to one tensor's content, by content digest
    (full blobs) and by blob name (deltas)."""

    like: TensorEntry
    fulls: dict[str, Source] = field(default_factory=dict)
    deltas: dict[str, Source] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def add(self, entry: TensorEntry, version: int) -> bool:
        """Count ``entry``'s blobs in where they can serve; whether it stores a full blob.

        Only entries of the same dtype, shape and size; a delta only if its
        frames cut the tensor as the target does, its blob is named either way
        round from its two contents, and this hotswap knows its encodings.
        """
        like, ref = self.like, entry.delta
        if (entry.dtype, entry.shape, entry.nbytes) != (like.dtype, like.shape, like.nbytes):
            return False
        if full_stored(entry) and entry.digest not in self.dropped:
            self.fulls.setdefault(entry.digest, Source(entry, version))
        if (
            ref is not None
            and ref.blob not in self.dropped
            and entry.chunk_bytes == like.chunk_bytes
            and reads_backwards(entry) is not None
            and unknown_encoding(entry, "") is None
        ):
            self.deltas.setdefault(ref.blob, Source(entry, version))
        return full_stored(entry)

    def drop(self, names: set[str]) -> None:
        """Leave out the full blobs (by digest) and deltas (by blob name) found broken."""
        self.dropped |= names
        for name in names:
            self.fulls.pop(name, None)
            self.deltas.pop(name, None)

    def plan(self, live: str | None, where: str) -> chain.Route:
        """The cheapest route to the target; FormatError when none is left."""
        fulls = [chain.Full(d, s.entry.nbytes, blob=d) for d, s in self.fulls.items()]
        deltas = [
            chain.Delta(s.entry.delta.base, s.entry.digest, s.entry.delta.stored_bytes, blob=b)
            for b, s in self.deltas.items()
            if s.entry.delta is not None
        ]
        return chain.plan_route(
            self.like.digest, live=live, fulls=fulls, deltas=deltas, where=where
        )

    def touches(self, digest: str) -> bool:
        """Whether any candidate starts or ends at ``digest``."""
        return digest in self.fulls or any(
            digest in (s.entry.digest, s.entry.delta.base)
            for s in self.deltas.values()
            if s.entry.delta is not None
        )


class History:
    """Older manifests of one version's lineage along ``parent``, each read at most once
    (shared by the tensors of that version)."""

    def __init__(
        self, manifests: Manifests | None, m: Manifest, newer: Sequence[Manifest] = ()
    ) -> None:
        self._manifests = manifests
        self._m = m
        # Manifests newer than ``m`` the caller already read (``verify`` of an
        # old kept version: gc may keep it reachable only backwards from a
        # newer keyframe); offered before the older ones.
        same = [n for n in newer if n.lineage == m.lineage and n.version > m.version]
        self._read: list[dict[str, TensorEntry]] = [n.by_name() for n in same]
        self._versions: list[int] = [n.version for n in same]
        self._extra = len(same)
        self._last = m
        self._ended = manifests is None

    def walk(self, name: str, limit: int) -> Iterator[tuple[TensorEntry, int]]:
        """Tensor ``name``'s entries in newer versions given, then up to ``limit`` older
        versions, newest first."""
        for i in range(limit + self._extra):
            if i == len(self._read) and not self._step():
                return
            entry = self._read[i].get(name)
            if entry is not None:
                yield entry, self._versions[i]

    def _step(self) -> bool:
        """Read the next older manifest; False at the lineage's start, a gap or a bad one."""
        parent, last = self._last.parent, self._last
        if self._ended or self._manifests is None or parent is None or parent >= last.version:
            self._ended = True
            return False
        try:
            older = self._manifests.manifest(parent)
        except (NotFound, IntegrityError):
            # Collected or unreadable: fewer routes, never a wrong one.
            self._ended = True
            return False
        if older.lineage != self._m.lineage:
            self._ended = True
            return False
        self._read.append(older.by_name())
        self._versions.append(older.version)
        self._last = older
        return True
