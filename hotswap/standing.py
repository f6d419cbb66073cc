"""What an agent shows: the versions it runs, sees and waits with, its state, its callbacks.

``Agent`` inherits these read-only views; they read the pipeline's state and
the status record, each under its own lock, and never Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hotswap.callbacks import OnApplied, OnRejected
from hotswap.errors import ValidationError

if TYPE_CHECKING:
    from hotswap.pipeline import Pipeline
    from hotswap.reporter import Reporter


class Standing:
    """The read-only part of ``hotswap.Agent`` (see there)."""

    _pipeline: Pipeline
    reporter: Reporter

    @property
    def applied_version(self) -> int | None:
        """The version the model runs (None until the first version is applied)."""
        return self._pipeline.state.running().version

    @property
    def manifest_digest(self) -> str | None:
        """BLAKE3 (hex) of the wire bytes of the manifest the model runs (None until the
        first version is applied): what the model runs, where a version number may
        name other content after Redis was restored from an older snapshot."""
        return self._pipeline.state.running().digest

    @property
    def head_version(self) -> int | None:
        """The head this agent last saw in Redis (None before the first look, or if none);
        with signing keys, the version the signed head record names; while a rollout
        pins this agent, the version it pins (``pinned_version``)."""
        return self._pipeline.lookout.head

    @property
    def pinned_version(self) -> int | None:
        """The version a rollout pinned this agent (or its track) to at its last look, while
        head is still the version the rollout started from; None: it follows head."""
        pin = self._pipeline.lookout.pin
        return None if pin is None else pin.version

    @property
    def head_seen(self) -> bool:
        """Whether the agent has read head from Redis at least once (``head_version``
        None then means that no version is published)."""
        return self._pipeline.lookout.looked

    @property
    def pending_version(self) -> int | None:
        """The fetched, valid version waiting for ``apply_pending()`` (manual mode)."""
        return self._pipeline.state.pending_version

    @property
    def state(self) -> str:
        """What the agent does now: starting, idle, fetching, applying, pending,
        disconnected or stopped (as its status record says)."""
        return self.reporter.status.state

    @property
    def last_rejection(self) -> ValidationError | None:
        """The error of the last version this agent refused, or None."""
        return self._pipeline.state.last_rejection

    @property
    def on_applied(self) -> OnApplied | None:
        """Called as ``on_applied(version, ApplyReport)`` after each applied version."""
        return self._pipeline.on_applied

    @on_applied.setter
    def on_applied(self, fn: OnApplied | None) -> None:
        self._pipeline.on_applied = fn

    @property
    def on_rejected(self) -> OnRejected | None:
        """Called as ``on_rejected(version, reasons)`` after each refused version."""
        return self._pipeline.on_rejected

    @on_rejected.setter
    def on_rejected(self, fn: OnRejected | None) -> None:
        self._pipeline.on_rejected = fn
