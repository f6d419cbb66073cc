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
    """What one publish or rollback did."""

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
    # Why the parent's manifest was not trusted (unsigned, forged, garbled), if so.
    untrusted_parent: str | None = None


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` kept and deleted."""

    kept: list[int]
    deleted_versions: list[int]
    blobs_deleted: int
    chunks_deleted: int
    blobs_kept_young: int
    dry_run: bool = False


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


def author() -> str:
    """user@host of this process, for manifests and the log."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
