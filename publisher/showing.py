"""What ``hotswap show`` and ``hotswap diff`` print: a version's entries, two versions compared.

As in ``publisher.render``: ``*_data`` is what ``--json`` prints, ``*_table``
draws it, and every string read from Redis is drawn through ``plain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.table import Table

from hotswap.manifest import Manifest, TensorEntry
from publisher import plan
from publisher.render import plain, size, when

if TYPE_CHECKING:  # valuediff imports torch; show and diff without --values must not
    from publisher.valuediff import Distance


def stored_as(e: TensorEntry) -> str:
    """How an entry's bytes are stored: "full", "delta <encodings>", or "keyframe" (both)."""
    if e.delta is None:
        return "full"
    kind = "keyframe: full + delta" if e.delta.keyframe else "delta"
    return f"{kind} {','.join(e.delta.encodings)}"


def stored_bytes(e: TensorEntry) -> int:
    """The bytes an entry's blobs take in Redis (full blob, delta frames, or both)."""
    if e.delta is None:
        return e.nbytes
    return e.delta.stored_bytes + (e.nbytes if e.delta.keyframe else 0)


def _stored(m: Manifest) -> dict[tuple[object, ...], int]:
    """Stored bytes by the way a content is stored: tied tensors count once."""
    return {(e.digest, e.chunk_bytes, e.delta): stored_bytes(e) for e in m.tensors}


def entry_data(e: TensorEntry) -> dict[str, Any]:
    return {
        **asdict(e),
        "shape": list(e.shape),
        "chunks": e.chunks,
        # Issue 19 (slices): whether per-chunk digests are stated, not their bytes.
        "chunk_digests": e.chunk_digests is not None,
        "stored_as": stored_as(e),
        "stored_bytes": stored_bytes(e),
    }


def manifest_data(m: Manifest) -> dict[str, Any]:
    return {
        "model": m.model,
        "version": m.version,
        "parent": m.parent,
        "kind": m.kind,
        "rollback_to": m.rollback_to,
        "lineage": m.lineage,
        "created": m.created,
        "author": m.author,
        "message": m.message,
        "key_id": m.key_id,
        "nbytes": m.nbytes,
        "tensors": [entry_data(e) for e in m.tensors],
    }


def manifest_table(m: Manifest) -> Table:
    kind = m.kind + (f" to v{m.rollback_to}" if m.rollback_to else "")
    parent = f"v{m.parent}" if m.parent else "none"
    signed = f"signed {m.key_id}" if m.key_id else "unsigned"
    table = Table(
        title=plain(
            f"model {m.model} v{m.version} ({kind}, parent {parent}, {when(m.created)}, "
            f"{m.author}, {signed}): {m.message}"
        ),
        caption=f"{len(m.tensors)} tensors, {size(m.nbytes)} "
        f"({size(sum(_stored(m).values()))} stored)",
    )
    cols = ("tensor", "dtype", "shape", "bytes", "stored as", "stored", "norm", "max |x|", "digest")
    for col in cols:
        right = col in ("bytes", "stored", "norm", "max |x|")
        table.add_column(col, justify="right" if right else "left")
    for e in m.tensors:
        table.add_row(
            plain(e.name),
            e.dtype,
            "x".join(map(str, e.shape)) or "scalar",
            size(e.nbytes),
            plain(stored_as(e)),
            size(stored_bytes(e)),
            f"{e.norm:.6g}",
            f"{e.max_abs:.6g}",
            e.digest[:12],
        )
    return table


def diff_data(
    a: Manifest, b: Manifest, distances: Mapping[str, Distance] | None = None
) -> dict[str, Any]:
    """Two versions compared by name: added, removed, changed (norms from the
    manifests; ``distances``, from ``valuediff``, adds ``distance`` = ‖new-old‖
    and ``max_abs_change``), and how many are unchanged."""
    d = plan.diff(a.tensors, b.tensors)
    old, new = a.by_name(), b.by_name()
    changed = []
    for name in d.changed:
        x, y = old[name], new[name]
        far = (distances or {}).get(name)
        changed.append(
            {
                "name": name,
                "old_norm": x.norm,
                "new_norm": y.norm,
                # |new| - |old|: how the norm moved, not how far the values did.
                "norm_change": y.norm - x.norm,
                "norm_ratio": y.norm / x.norm if x.norm else None,
                "distance": None if far is None else far.norm,
                "max_abs_change": None if far is None else far.max_abs,
                "old_shape": list(x.shape),
                "new_shape": list(y.shape),
                "old_dtype": x.dtype,
                "new_dtype": y.dtype,
            }
        )
    return {
        "model": a.model,
        "a": a.version,
        "b": b.version,
        "added": d.added,
        "removed": d.removed,
        "changed": changed,
        "unchanged": len(d.unchanged),
    }


def diff_table(data: dict[str, Any]) -> Table:
    values = any(c["distance"] is not None for c in data["changed"])
    table = Table(
        title=plain(f"model {data['model']}: v{data['a']} -> v{data['b']}"),
        caption=f"{data['unchanged']} tensors unchanged"
        + ("" if values else "; --values adds ‖new-old‖ (reads both versions' bytes)"),
    )
    cols = ["tensor", "change", "norm before", "norm after", "norm change", "ratio"]
    cols += ["‖new-old‖", "max |new-old|"] if values else []
    for col in cols:
        table.add_column(col, justify="left" if col in ("tensor", "change") else "right")
    blank = [""] * (len(cols) - 2)
    for name in data["added"]:
        table.add_row(plain(name), "[green]added[/green]", *blank)
    for name in data["removed"]:
        table.add_row(plain(name), "[red]removed[/red]", *blank)
    for c in data["changed"]:
        kind = "changed"
        if c["old_shape"] != c["new_shape"] or c["old_dtype"] != c["new_dtype"]:
            kind = (
                f"changed ({c['old_dtype']} {c['old_shape']} -> {c['new_dtype']} {c['new_shape']})"
            )
        ratio = "-" if c["norm_ratio"] is None else f"{c['norm_ratio']:.4g}"
        far = [_num(c["distance"]), _num(c["max_abs_change"])] if values else []
        table.add_row(
            plain(c["name"]),
            plain(kind),
            f"{c['old_norm']:.6g}",
            f"{c['new_norm']:.6g}",
            f"{c['norm_change']:+.4g}",
            ratio,
            *far,
        )
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
