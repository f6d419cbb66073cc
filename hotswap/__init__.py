"""hotswap: Redis-backed hot updates of the weights of running PyTorch models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from hotswap.agent import Agent
    from hotswap.settings import HotswapSettings
    from hotswap.validate import Policy

# Imported on first use (PEP 562): the agent and the validator pull in torch
# (about 3 s of CPU), which the command line's status/log/show/diff/gc and
# anything importing only hotswap.errors or hotswap.keys do not need.
_LAZY = {
    "Agent": "hotswap.agent",
    "HotswapSettings": "hotswap.settings",
    "Policy": "hotswap.validate",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hotswap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
