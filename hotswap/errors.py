"""Every error hotswap raises, under one root.

    HotswapError
    ├── ConfigError        bad settings, model name, URL or argument
    ├── SourceError        a checkpoint or state dict that cannot be published
    ├── NotFound           unknown model, version, or collected blobs
    ├── VersionConflict    head moved since the publish read it
    ├── IntegrityError     bytes that do not match what was promised
    │   ├── FormatError    malformed or oversized manifest / notice / record
    │   └── SignatureError missing, unknown or wrong signature
    ├── ValidationError    a version refused by the validation policy
    ├── StoreFull          Redis out of memory (maxmemory reached)
    └── StoreUnavailable   Redis unreachable after the retry budget

Messages are one line and name the model, version or tensor at fault.
"""

from __future__ import annotations


class HotswapError(Exception):
    """Root of every error raised by hotswap."""


class ConfigError(HotswapError):
    """A setting, name or argument is invalid."""


class SourceError(HotswapError):
    """A checkpoint file or state dict cannot be published."""


class NotFound(HotswapError):
    """A model, version or blob does not exist in Redis."""


class VersionConflict(HotswapError):
    """Another publisher moved head since this publish read it."""


class IntegrityError(HotswapError):
    """Stored bytes do not match their digest or declared size."""


class FormatError(IntegrityError):
    """Encoded data is malformed or declares sizes beyond the limits."""


class SignatureError(IntegrityError):
    """A manifest's signature is missing, unknown or wrong."""


class ValidationError(HotswapError):
    """A version was rejected by the validation policy."""

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.reasons: dict[str, list[str]] = reasons or {}


class StoreFull(HotswapError):
    """Redis refused a write because it is out of memory (``maxmemory``).

    Not a ``StoreUnavailable``: retrying will not help until someone frees
    memory or raises the limit.
    """


class StoreUnavailable(HotswapError):
    """Redis could not be reached within the retry budget."""
