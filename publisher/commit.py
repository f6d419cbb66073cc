"""What a commit writes and reports, pure: the manifest, its signed head, the log entry.

``Publisher._commit`` reserves the number, calls these steps and writes
their result in one ``Store.commit``; nothing here touches Redis.

Creation times never go backwards along a model: an agent with signing keys
refuses a signed head issued before the newest it accepted, and a head record
is issued at its manifest's creation. So a new manifest is created at
``not_before`` at the earliest (just after its parent and the record in
Redis) even when this host's clock stepped back or runs behind another
publisher's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotswap import codec, headrecord
from hotswap import notice as nt
from hotswap.errors import IntegrityError
from hotswap.headrecord import HeadRecord
from hotswap.manifest import Manifest, TensorEntry
from publisher.plan import Head, cause
from publisher.reports import PublishReport, author, describe

if TYPE_CHECKING:
    from publisher.base import Tally

# The step that keeps creation and issue times strictly increasing: well above
# a float's resolution at today's epoch seconds, well below anything a person sees.
TICK = 1e-3
# The clock new manifests and head records are stamped with (tests step it back).
now = time.time


@dataclass(frozen=True)
class Change:
    """What one commit puts on top of head: the new version's entries, how it came
    about (``kind``, ``rollback_to``, ``lineage``: None for head's), what its log and
    report say, and whether it becomes head (``promote``)."""

    entries: Sequence[TensorEntry]
    kind: str
    message: str
    changed: int
    sent: int = 0
    rollback_to: int | None = None
    lineage: str | None = None
    skipped: dict[int, str] | None = None
    tally: Tally | None = None
    promote: bool = True


def not_before(head: Head, record: bytes | None, keys: Sequence[bytes]) -> float:
    """The earliest creation time for a manifest on top of ``head``: just after the
    parent's creation and the issue of the head record Redis holds (if it verifies
    with ``keys``: a forged one could otherwise push every later time out of reach)."""
    floor = 0.0
    if head.manifest is not None:
        floor = head.manifest.created + TICK
    if record is not None and keys:
        try:
            issued = headrecord.decode(record, keys=list(keys), expect_model=head.model).issued
        except IntegrityError:
            issued = 0.0
        floor = max(floor, issued + TICK)
    return floor


def new_manifest(
    head: Head,
    version: int,
    entries: Sequence[TensorEntry],
    *,
    kind: str,
    rollback_to: int | None,
    message: str,
    lineage: str,
    earliest: float = 0.0,
) -> Manifest:
    """The manifest of ``version``, on top of ``head``, written by this process now
    (or at ``earliest``, from ``not_before``, if the clock is behind it)."""
    return Manifest(
        model=head.model,
        version=version,
        parent=head.number,
        lineage=lineage,
        tensors=tuple(entries),
        kind=kind,
        rollback_to=rollback_to,
        created=max(now(), earliest),
        author=author(),
        message=message,
    )


def head_record(m: Manifest, data: bytes, expiry: float, issued: float | None = None) -> HeadRecord:
    """The signed head naming manifest ``m`` (wire bytes ``data``), issued at its
    creation (or ``issued``: a re-sign) and expiring ``expiry`` seconds later (0: never)."""
    at = m.created if issued is None else issued
    return HeadRecord(
        model=m.model,
        version=m.version,
        lineage=m.lineage,
        manifest=codec.digest(data),
        issued=at,
        expires=at + expiry if expiry > 0 else None,
    )


def announcement(
    m: Manifest, data: bytes, key: bytes | None, expiry: float, issued: float | None = None
) -> tuple[bytes, bytes | None]:
    """The notice that announces ``m`` (wire bytes ``data``) as head, and the signed head
    record naming it (``head_record``; None without a signing ``key``)."""
    notice = nt.encode(nt.Notice(m.model, m.version, m.kind, m.lineage, nt.carried(data)))
    if key is None:
        return notice, None
    return notice, headrecord.encode(head_record(m, data, expiry, issued), key)


def log_fields(
    m: Manifest,
    head: Head,
    changed: int,
    sent: int,
    *,
    skipped: dict[int, str] | None = None,
    promoted: bool = True,
) -> dict[str, str | int | float]:
    """The log entry of a commit (``hotswap log``), with why the parent was not trusted,
    what a rollback's default target passed over, and whether it became head
    (``promoted`` 0: stored beside head, ``Publisher.promote`` makes it head)."""
    fields: dict[str, str | int | float] = {
        "version": m.version,
        "kind": m.kind,
        "author": m.author,
        "created": m.created,
        "message": m.message,
        "tensors_changed": changed - removed(m, head),
        "tensors_removed": removed(m, head),
        "bytes_uploaded": sent,
        "bytes_total": m.nbytes,
        "parent": "" if m.parent is None else m.parent,
        "rollback_to": "" if m.rollback_to is None else m.rollback_to,
        "promoted": int(promoted),
    }
    if head.distrust is not None:
        fields["untrusted_parent"] = cause(head.distrust)
    if skipped:
        fields["skipped"] = describe(skipped)
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


def committed(
    m: Manifest,
    head: Head,
    changed: int,
    sent: int,
    seconds: float,
    *,
    skipped: dict[int, str] | None = None,
) -> PublishReport:
    """The report of a publish or rollback that created ``m``."""
    gone = removed(m, head)
    return PublishReport(
        version=m.version,
        parent=m.parent,
        created=True,
        tensors_total=len(m.tensors),
        # ``changed`` counts names added, removed and changed; "N of TOTAL" must not.
        tensors_changed=changed - gone,
        tensors_removed=gone,
        bytes_total=m.nbytes,
        bytes_uploaded=sent,
        bytes_skipped=m.nbytes - sent,
        seconds=seconds,
        kind=m.kind,
        rollback_to=m.rollback_to,
        untrusted_parent=None if head.distrust is None else cause(head.distrust),
        skipped=dict(skipped or {}),
    )


def removed(m: Manifest, head: Head) -> int:
    """Tensors head's (trusted) manifest has and ``m`` lacks."""
    if head.manifest is None:
        return 0
    return len({e.name for e in head.manifest.tensors} - {e.name for e in m.tensors})


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
