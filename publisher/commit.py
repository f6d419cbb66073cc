"""What a commit writes and reports, pure: the manifest, its log entry, the report.

``Publisher._commit`` reserves the number, calls these steps and writes
their result in one ``Store.commit``; nothing here touches Redis.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hotswap.manifest import Manifest, TensorEntry
from publisher.plan import Head, cause
from publisher.reports import PublishReport, author


def new_manifest(
    head: Head,
    version: int,
    entries: Sequence[TensorEntry],
    *,
    kind: str,
    rollback_to: int | None,
    message: str,
    lineage: str,
) -> Manifest:
    """The manifest of ``version``, on top of ``head``, written by this process now."""
    return Manifest(
        model=head.model,
        version=version,
        parent=head.number,
        lineage=lineage,
        tensors=tuple(entries),
        kind=kind,
        rollback_to=rollback_to,
        created=time.time(),
        author=author(),
        message=message,
    )


def log_fields(m: Manifest, head: Head, changed: int, sent: int) -> dict[str, str | int | float]:
    """The log entry of a commit (``hotswap log``), with why the parent was not trusted."""
    fields: dict[str, str | int | float] = {
        "version": m.version,
        "kind": m.kind,
        "author": m.author,
        "created": m.created,
        "message": m.message,
        "tensors_changed": changed,
        "bytes_uploaded": sent,
        "bytes_total": m.nbytes,
        "parent": "" if m.parent is None else m.parent,
        "rollback_to": "" if m.rollback_to is None else m.rollback_to,
    }
    if head.distrust is not None:
        fields["untrusted_parent"] = cause(head.distrust)
    return fields


def untrusted_warning(m: Manifest, head: Head) -> tuple[object, ...]:
    """The log line (format and arguments) for a version committed over an untrusted head."""
    did = "published" if m.kind == "publish" else f"rolled back to v{m.rollback_to} as"
    checked = "hashed, checked and " if m.kind == "publish" else ""
    return (
        "model %r: %s v%d on top of v%d without trusting it (%s): "
        "every tensor was %scounted as changed",
        m.model,
        did,
        m.version,
        head.number,
        cause(head.distrust),
        checked,
    )


def committed(m: Manifest, head: Head, changed: int, sent: int, seconds: float) -> PublishReport:
    """The report of a publish or rollback that created ``m``."""
    return PublishReport(
        version=m.version,
        parent=m.parent,
        created=True,
        tensors_total=len(m.tensors),
        tensors_changed=changed,
        bytes_total=m.nbytes,
        bytes_uploaded=sent,
        bytes_skipped=m.nbytes - sent,
        seconds=seconds,
        kind=m.kind,
        rollback_to=m.rollback_to,
        untrusted_parent=None if head.distrust is None else cause(head.distrust),
    )


def unchanged(head: Manifest, tensors: int, sent: int, seconds: float) -> PublishReport:
    """The report of a publish that found nothing changed since ``head`` (no version made)."""
    return PublishReport(
        version=head.version,
        parent=head.parent,
        created=False,
        tensors_total=tensors,
        tensors_changed=0,
        bytes_total=head.nbytes,
        bytes_uploaded=sent,
        bytes_skipped=head.nbytes - sent,
        seconds=seconds,
    )
