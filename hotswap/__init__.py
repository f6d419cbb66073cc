"""hotswap: Redis-backed hot updates of the weights of running PyTorch models."""

from __future__ import annotations

from hotswap.errors import (
    ConfigError,
    FormatError,
    HotswapError,
    IntegrityError,
    NotFound,
    SignatureError,
    SourceError,
    StoreUnavailable,
    ValidationError,
    VersionConflict,
)
from hotswap.settings import HotswapSettings

__all__ = [
    "ConfigError",
    "FormatError",
    "HotswapError",
    "HotswapSettings",
    "IntegrityError",
    "NotFound",
    "SignatureError",
    "SourceError",
    "StoreUnavailable",
    "ValidationError",
    "VersionConflict",
]
__version__ = "0.1.0"
