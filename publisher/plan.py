"""Pure planning of a publish: which tensors to read, what changed, what it builds on.

No Redis here: these functions take names and manifest entries and are
tested on their own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hotswap import keys
from hotswap.errors import ConfigError, HotswapError, NotFound, SourceError
from hotswap.manifest import Manifest, TensorEntry


def select(names: Sequence[str], only: Sequence[str] | None, where: str) -> list[str]:
    """The names matching any glob of ``only`` (all names when ``only`` is None).

    A glob that matches nothing is an error: it is almost always a typo, and
    publishing "nothing changed" silently would hide it.
    """
    if only is None:
        return list(names)
    if not only:
        raise ConfigError("--only was given no glob")
    chosen = set()
    for glob in only:
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise SourceError(f"{where}: --only {glob!r} matches no tensor")
        chosen.update(hits)
    return [n for n in names if n in chosen]


@dataclass(frozen=True)
class Diff:
    """Names added, removed, changed (content) and unchanged between two versions."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


def diff(old: Iterable[TensorEntry], new: Iterable[TensorEntry]) -> Diff:
    """Compare two sets of entries by name and content (digest, dtype, shape)."""
    a = {e.name: e for e in old}
    b = {e.name: e for e in new}
    out = Diff()
    for name in sorted(a.keys() | b.keys()):
        if name not in a:
            out.added.append(name)
        elif name not in b:
            out.removed.append(name)
        elif a[name].same_content(b[name]):
            out.unchanged.append(name)
        else:
            out.changed.append(name)
    return out


def merge(parent: Iterable[TensorEntry], updates: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The parent's entries with ``updates`` replacing or adding by name (``--only``)."""
    merged = {e.name: e for e in parent}
    merged.update({e.name: e for e in updates})
    return [merged[n] for n in sorted(merged)]


def blob_of(entry: TensorEntry) -> str:
    """The blob id an entry's chunks are stored under (shared by equal content)."""
    return keys.blob_id(entry.digest, entry.chunk_bytes, entry.chunks)


def unique_blobs(entries: Iterable[TensorEntry]) -> dict[str, TensorEntry]:
    """One entry per distinct blob (tied tensors and repeats share one), empty ones left out."""
    out: dict[str, TensorEntry] = {}
    for e in entries:
        if e.chunks:
            out.setdefault(blob_of(e), e)
    return out


@dataclass(frozen=True)
class Head:
    """What a publish builds on: head's number and, when it can be trusted, its manifest.

    An untrusted head (``manifest`` None, ``distrust`` saying why) lends a full
    publish or a rollback only its number, as the parent and for the
    compare-and-set.
    """

    model: str
    number: int | None
    manifest: Manifest | None = None
    distrust: HotswapError | None = None
    signing: bool = False

    def refusal(self, why: str) -> HotswapError:
        """The error for an operation that needs this untrusted head's content."""
        way = "a signed version" if self.signing else "a version"
        return type(self.distrust or HotswapError())(
            f"model {self.model!r}: head v{self.number} cannot be trusted "
            f"({cause(self.distrust)}); {why}: publish the whole model to put {way} on top"
        )


def cause(e: HotswapError | None) -> str:
    """The first clause of an error: what is wrong, without the advice after ';'."""
    if isinstance(e, NotFound):
        return "its manifest is missing"
    return str(e).split("; ")[0]
