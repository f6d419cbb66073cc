"""hotswap: Redis-backed hot updates of the weights of running PyTorch models."""

from __future__ import annotations

from hotswap.agent import Agent
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
from hotswap.validate import Policy

__all__ = [
    "Agent",
    "ConfigError",
    "FormatError",
    "HotswapError",
    "HotswapSettings",
    "IntegrityError",
    "NotFound",
    "Policy",
    "SignatureError",
    "SourceError",
    "StoreUnavailable",
    "ValidationError",
    "VersionConflict",
]
__version__ = "0.1.0"
