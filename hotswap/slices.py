"""Partial subscription: which part of each published tensor an agent's live tensor holds.

Imports no Redis. A tensor-parallel rank holds a slice of a weight along one
dimension (``ShardSpec(rank, world_size, dim)``); an expert-parallel rank
holds some tensors whole (``tensors=[globs]``). ``Slicer`` turns a manifest
(live names, after the agent's ``NameMap``) into the one this agent stages:
entries outside ``tensors`` left out, and each sliced entry replaced by a
``SliceEntry`` whose shape and size are the slice's, so the metadata check
compares it with the live tensor and staging sizes its buffer for the slice.
How its bytes are read and checked is ``hotswap.slice_read``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from hotswap import dtypes
from hotswap.entries import TensorEntry
from hotswap.errors import ConfigError
from hotswap.manifest import Manifest

# The subject of a rejection for slices that cannot apply (not a tensor).
SLICES = "<slices>"


@dataclass(frozen=True)
class Part:
    """Elements ``start:stop`` along dimension ``dim`` of a published tensor."""

    dim: int
    start: int
    stop: int

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a part that does not fit ``shape`` (ConfigError naming the tensor)."""
        if not 0 <= self.dim < len(shape):
            raise ConfigError(
                f"tensor {name!r} of shape {list(shape)} has no dimension {self.dim} to slice"
            )
        if not 0 <= self.start < self.stop <= shape[self.dim]:
            raise ConfigError(
                f"tensor {name!r}: slice {self.start}:{self.stop} of dimension {self.dim} "
                f"is outside its {shape[self.dim]} elements"
            )

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this part of a tensor of ``shape``."""
        return (*shape[: self.dim], self.stop - self.start, *shape[self.dim + 1 :])


@dataclass(frozen=True)
class ShardSpec:
    """Rank ``rank`` of ``world_size`` holds the ``rank``-th equal part along ``dim``.

    Dimension 0 (rows of a row-major tensor: a column-parallel ``Linear``'s
    weight) is one contiguous byte range, read as about ``1/world_size`` of
    the bytes; any other dimension (a row-parallel ``Linear``'s weight, dim 1)
    is strided and costs a read of the whole tensor (docs/design.md, "Slices").

    Example:
        >>> ShardSpec(1, 4).part("w", (8, 3))
        Part(dim=0, start=2, stop=4)
    """

    rank: int
    world_size: int
    dim: int = 0

    def __post_init__(self) -> None:
        for what in ("rank", "world_size", "dim"):
            v = getattr(self, what)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"ShardSpec {what} must be an int, not {type(v).__name__}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"ShardSpec rank {self.rank} is not in 0..{self.world_size - 1}")
        if self.dim < 0:
            raise ConfigError(f"ShardSpec dim {self.dim} is negative")

    def part(self, name: str, shape: tuple[int, ...]) -> Part:
        """This rank's part of a tensor ``name`` of ``shape``.

        Raises:
            ConfigError: no such dimension, or one that does not split into equal parts.
        """
        if self.dim >= len(shape):
            raise ConfigError(
                f"tensor {name!r} of shape {list(shape)} has no dimension {self.dim} to shard"
            )
        size = shape[self.dim]
        if size % self.world_size:
            raise ConfigError(
                f"tensor {name!r}: dimension {self.dim} of {size} elements does not split "
                f"into {self.world_size} equal parts; give a callable that returns its Part"
            )
        step = size // self.world_size
        return Part(self.dim, self.rank * step, (self.rank + 1) * step)


Chooser = Callable[[str, tuple[int, ...]], "Part | ShardSpec | None"]
"""``(live name, published shape) -> Part | ShardSpec | None`` (None: the whole tensor)."""


class Slicer:
    """What part of each published tensor this agent holds.

    Args:
        shards: ``{glob: ShardSpec}`` over live names (the first glob that
            matches a name decides it), or a ``Chooser`` callable.
        tensors: globs of the live names this agent takes; the others are
            left out of every version (None: all).

    Example:
        >>> s = Slicer({"*.qkv.weight": ShardSpec(0, 2)}, tensors=["layers.0.*"])
        >>> s.part("layers.0.qkv.weight", (4, 2)), s.wants("layers.1.qkv.weight")
        (Part(dim=0, start=0, stop=2), False)
    """

    def __init__(
        self,
        shards: Mapping[str, ShardSpec] | Chooser | None = None,
        tensors: Sequence[str] | None = None,
    ) -> None:
        if isinstance(tensors, str):
            tensors = [tensors]
        if tensors is not None and not all(isinstance(g, str) and g for g in tensors):
            raise ConfigError("tensors must be a list of non-empty glob strings")
        if shards is not None and not callable(shards):
            if not isinstance(shards, Mapping):
                raise ConfigError(
                    f"shards must be a mapping of globs to ShardSpec or a callable, "
                    f"not {type(shards).__name__}"
                )
            for glob, spec in shards.items():
                if not isinstance(glob, str) or not glob or not isinstance(spec, ShardSpec):
                    raise ConfigError(f"shards[{glob!r}] must map a glob to a ShardSpec")
        self.shards = shards
        self.tensors: tuple[str, ...] | None = None if tensors is None else tuple(tensors)
        self.halos = Halos()

    @property
    def identity(self) -> bool:
        """True when every published tensor is taken whole."""
        return self.shards is None and self.tensors is None

    def wants(self, name: str) -> bool:
        return self.tensors is None or any(fnmatchcase(name, g) for g in self.tensors)

    def part(self, name: str, shape: tuple[int, ...]) -> Part | None:
        """The part of ``name`` this agent holds (None: all of it); ConfigError if it cannot."""
        if self.shards is None:
            return None
        if callable(self.shards):
            got = self.shards(name, shape)
        else:
            got = next((s for g, s in self.shards.items() if fnmatchcase(name, g)), None)
        if got is None:
            return None
        if isinstance(got, ShardSpec):
            got = got.part(name, shape)
        if not isinstance(got, Part):
            raise ConfigError(
                f"the shards callable returned {type(got).__name__} for {name!r}; "
                "return a Part, a ShardSpec or None"
            )
        got.check(name, shape)
        return None if got.stop - got.start == shape[got.dim] else got

    def apply(self, m: Manifest) -> Manifest:
        """``m`` (live names) as this agent stages it: wanted entries, sliced ones as
        ``SliceEntry``. Raises ConfigError for a part that does not fit its tensor."""
        if self.identity:
            return m
        out: list[TensorEntry] = []
        for e in m.tensors:
            if not self.wants(e.name):
                continue
            p = self.part(e.name, e.shape)
            out.append(e if p is None else SliceEntry.of(e, p, self.halos))
        return dataclasses.replace(m, tensors=tuple(out))


# The most bytes of boundary chunks an agent keeps (``Halos``): past it the
# tensors used longest ago lose theirs, and their next delta is rebuilt whole.
HALO_BYTES = 1 << 30


class Halos:
    """The whole boundary chunks of the content each sliced tensor last read, by name.

    One content per name (a delta's frames apply only against what runs, and
    the last content read is what runs or what is about to), at most two
    chunks each: about two chunks per sliced tensor (2 MiB at the default
    chunk size), and no more than ``budget`` bytes in all (``HALO_BYTES``).

    Example:
        >>> h = Halos()
        >>> h.put("w", "d1", {0: b"ab"})
        >>> h.get("w", "d1"), h.get("w", "d2")
        ({0: b'ab'}, None)
    """

    def __init__(self, budget: int = HALO_BYTES) -> None:
        self._budget = budget
        self._by_name: OrderedDict[str, tuple[str, dict[int, bytes]]] = OrderedDict()
        self.nbytes = 0

    def get(self, name: str, digest: str) -> dict[int, bytes] | None:
        kept = self._by_name.get(name)
        return kept[1] if kept is not None and kept[0] == digest else None

    def put(self, name: str, digest: str, chunks: dict[int, bytes]) -> None:
        self._drop(name)
        size = sum(map(len, chunks.values()))
        if size > self._budget:
            return
        while self._by_name and self.nbytes + size > self._budget:
            self._drop(next(iter(self._by_name)))
        self._by_name[name] = (digest, chunks)
        self.nbytes += size

    def _drop(self, name: str) -> None:
        kept = self._by_name.pop(name, None)
        if kept is not None:
            self.nbytes -= sum(map(len, kept[1].values()))


@dataclass(frozen=True)
class SliceEntry(TensorEntry):
    """A published entry as a rank stages it: the shape and size of its part.

    ``digest`` stays the published content's (what runs is "``part`` of that
    content", so an unchanged tensor is not fetched again); ``norm`` is NaN
    until the slice's bytes are verified (the manifest states whole-tensor
    norms only), then the norm of those bytes.
    """

    full: TensorEntry | None = None
    part: Part | None = None
    # The agent's boundary chunks of contents it read (``slice_delta.Halos``).
    halos: Halos | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, full: TensorEntry, part: Part, halos: Halos | None = None) -> SliceEntry:
        shape = part.shape(full.shape)
        itemsize = dtypes.DTYPES[full.dtype].itemsize
        fields = {f.name: getattr(full, f.name) for f in dataclasses.fields(TensorEntry)}
        fields.update(
            shape=shape,
            nbytes=math.prod(shape) * itemsize,
            norm=math.nan,
            max_abs=math.nan,
            full=full,
            part=part,
            halos=halos,
        )
        return cls(**fields)


def unsliced(m: Manifest) -> Manifest:
    """``m`` with every ``SliceEntry`` back to its published entry (for reconstruction)."""
    if not any(isinstance(e, SliceEntry) for e in m.tensors):
        return m
    return dataclasses.replace(
        m,
        tensors=tuple(e.full if isinstance(e, SliceEntry) and e.full else e for e in m.tensors),
    )
