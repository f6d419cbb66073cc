"""Completeness of a full publish: which parent tensors it leaves out, pure.

A full publish (no ``only``) replaces the whole model. A tensor of the parent
that the new version lacks would be left behind: an agent that ran the parent
keeps the parent's bytes, a fresh one keeps its own, and both report the same
version. So omitting a tensor must be said, with ``exclude`` globs, which also
keep matching tensors of the source out of the version.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from hotswap.errors import SourceError
from hotswap.manifest import Manifest, TensorEntry

# Names shown in the refusal; the rest are counted (the message stays one line).
SHOWN = 10


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the ``exclude`` globs."""
    return any(fnmatch.fnmatchcase(name, glob) for glob in exclude)


def kept(names: Iterable[str], exclude: Sequence[str]) -> list[str]:
    """``names`` without those matching an ``exclude`` glob, in order."""
    return [n for n in names if not is_excluded(n, exclude)]


def kept_entries(entries: Iterable[TensorEntry], exclude: Sequence[str]) -> list[TensorEntry]:
    """``entries`` without those whose name matches an ``exclude`` glob."""
    return [e for e in entries if not is_excluded(e.name, exclude)]


def check(
    parent: Manifest | None, names: Iterable[str], exclude: Sequence[str], where: str
) -> None:
    """Refuse a full publish of ``names`` that lacks tensors of ``parent`` not excluded.

    Raises:
        SourceError: listing the parent's tensors that are neither in
            ``names`` nor matched by ``exclude``.
    """
    if parent is None:
        return
    present = set(names)
    lacking = sorted(
        t.name for t in parent.tensors if t.name not in present and not is_excluded(t.name, exclude)
    )
    if not lacking:
        return
    shown = ", ".join(repr(n) for n in lacking[:SHOWN])
    more = f" and {len(lacking) - SHOWN} more" if len(lacking) > SHOWN else ""
    plural = "tensor" if len(lacking) == 1 else "tensors"
    raise SourceError(
        f"{where}: a full publish lacks {len(lacking)} {plural} of head v{parent.version} "
        f"({shown}{more}); add them, or name them with exclude=[GLOB] (--exclude GLOB) to "
        "drop them from the new version, or publish a subset with only=[GLOB] (--only GLOB)"
    )
