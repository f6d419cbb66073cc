"""What a publish, rollback, gc or verify reports, and the progress callback type."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

Progress = Callable[[str, int, int], None]
"""``progress(phase, bytes_done, bytes_total)``; phase is "hash", "upload" or "verify"."""


@dataclass(frozen=True)
class PublishReport:
    """What one publish or rollback did (``Publisher.last_report``).

    Attributes:
        version: the version made, or head's when nothing changed.
        parent: the version it was built on (None for a model's first).
        created: False when nothing changed since head and no version was made.
        tensors_total: tensors in the version.
        tensors_changed: tensors of the version whose content differs from the
            parent's (added ones included).
        tensors_removed: tensors the parent had and the version lacks.
        bytes_total: bytes of all its tensors.
        bytes_uploaded: bytes this publish sent to Redis (0 for a rollback).
        bytes_skipped: bytes already in Redis, not sent again.
        seconds: how long the publish or rollback took.
        kind: "publish" or "rollback".
        rollback_to: the version a rollback restored.
        untrusted_parent: why the parent's manifest was not trusted, if so.
        skipped: versions a rollback's default target passed over, newest
            first, each with why ("retracted by v4", "holds what v4 holds").
        tensors_delta: new contents stored as deltas from the parent's bytes
            (issue 14); their frames took ``bytes_delta`` of ``bytes_uploaded``.
        keyframes: of those, the ones whose full blob was stored too (a chain
            of deltas got long).
        bases: where the bytes of changed tensors' parents came from, in
            tensors: "memory" (this publisher's base), "redis" (read back,
            ``bytes_base_read`` bytes), "missing" (none: a full blob went).
        base_held: host memory the publisher's base holds after this publish.

    Example::

        pub.publish(model.state_dict())
        r = pub.last_report
        if r.created:
            print(f"v{r.version}: {r.tensors_changed} tensors, {r.bytes_uploaded} bytes sent")
    """

    version: int
    parent: int | None
    created: bool
    tensors_total: int
    tensors_changed: int
    bytes_total: int
    bytes_uploaded: int
    bytes_skipped: int
    seconds: float
    kind: str = "publish"
    rollback_to: int | None = None
    untrusted_parent: str | None = None
    skipped: dict[int, str] = field(default_factory=dict)
    tensors_delta: int = 0
    keyframes: int = 0
    bytes_delta: int = 0
    bases: dict[str, int] = field(default_factory=dict)
    bytes_base_read: int = 0
    base_held: int = 0
    tensors_removed: int = 0


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` kept and deleted, and what it skipped.

    ``malformed_index`` counts blob index members that are not ids a publish
    writes (skipped, left in the index); ``malformed_examples`` names a few,
    each with why. ``pins_unknown`` says why every version was kept: some live
    agent's record could not be read, so it may run any of them.
    ``chain_versions`` are older versions whose manifests were kept (not
    counted in ``kept``; their blobs no kept version needs deleted) because
    kept versions' chains of deltas go through their entries;
    ``broken_chains`` names each kept tensor that no stored blobs reach
    (``"v5 tensor 'w'"``: why), its own blobs kept. The ``blobs_kept_young``
    unreferenced blobs a publish touched within ``grace_seconds`` become
    collectable from ``young_from`` until ``young_until`` (Unix times; None
    when there are none). ``bytes_freed`` is what the deleted blobs' chunks
    held in Redis (with ``dry_run``: what deleting them would free).
    """

    kept: list[int]
    deleted_versions: list[int]
    blobs_deleted: int
    chunks_deleted: int
    blobs_kept_young: int
    dry_run: bool = False
    malformed_index: int = 0
    malformed_examples: dict[str, str] = field(default_factory=dict)
    pins_unknown: list[str] = field(default_factory=list)
    chain_versions: list[int] = field(default_factory=list)
    broken_chains: dict[str, str] = field(default_factory=dict)
    grace_seconds: float = 0.0
    young_from: float | None = None
    young_until: float | None = None
    bytes_freed: int = 0


@dataclass(frozen=True)
class VerifyReport:
    """A version re-read from Redis: tensors whose bytes do not match their digest."""

    version: int
    tensors_checked: int
    bytes_checked: int
    bad: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad


def describe(skipped: dict[int, str]) -> str:
    """Versions passed over, grouped by why, for messages and the log.

    Example:
        >>> describe({3: "retracted by v4", 2: "retracted by v4", 1: "holds what v4 holds"})
        'v3, v2: retracted by v4; v1: holds what v4 holds'
    """
    by_reason: dict[str, list[int]] = {}
    for version, why in skipped.items():
        by_reason.setdefault(why, []).append(version)
    return "; ".join(
        ", ".join(f"v{v}" for v in versions) + f": {why}" for why, versions in by_reason.items()
    )


def author() -> str:
    """user@host of this process, for manifests and the log."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
