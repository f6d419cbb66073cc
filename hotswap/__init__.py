"""hotswap: Redis-backed hot updates of the weights of running PyTorch models.

Serving: ``Agent`` keeps a live model's weights at the newest version,
checked by a ``Policy`` (per-name ``Override``); ``on_applied`` callbacks get
an ``ApplyReport``; ``readiness(agent)`` answers health and readiness
probes; ``NameMap`` and ``Transform`` fit checkpoints whose names or layout
are not the model's. ``HotswapSettings`` holds the configuration. Reading Redis
directly (status pages, health probes): ``connect``, ``Store`` and
``operation_retry``, none of which imports torch. Every error derives from
``HotswapError``. Publishing is ``publisher.Publisher``.
"""

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
    StoreFull,
    StoreUnavailable,
    ValidationError,
    VersionConflict,
)

if TYPE_CHECKING:
    from hotswap.agent import Agent
    from hotswap.connection import connect, operation_retry
    from hotswap.group import GroupError
    from hotswap.names import NameMap
    from hotswap.postapply import Probation
    from hotswap.probes import Readiness, readiness
    from hotswap.reporter import ApplyReport
    from hotswap.settings import HotswapSettings
    from hotswap.slices import ShardSpec
    from hotswap.store import Store
    from hotswap.transform import Transform
    from hotswap.validate import Override, Policy

# Imported on first use (PEP 562): the agent and the validator pull in torch,
# a heavy import that the command line's status/log/show/diff/gc and anything
# importing only hotswap.errors or hotswap.keys do not need. Each name maps to
# the module that defines it.
_LAZY = {
    "Agent": "hotswap.agent",
    "ApplyReport": "hotswap.reporter",
    "GroupError": "hotswap.group",
    "HotswapSettings": "hotswap.settings",
    "NameMap": "hotswap.names",
    "Override": "hotswap.validate",
    "Policy": "hotswap.validate",
    "Probation": "hotswap.postapply",
    "Readiness": "hotswap.probes",
    "ShardSpec": "hotswap.slices",
    "Store": "hotswap.store",
    "Transform": "hotswap.transform",
    "connect": "hotswap.connection",
    "operation_retry": "hotswap.connection",
    "readiness": "hotswap.probes",
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
    "ApplyReport",
    "ConfigError",
    "FormatError",
    "GroupError",
    "HotswapError",
    "HotswapSettings",
    "IntegrityError",
    "NameMap",
    "NotFound",
    "Override",
    "Policy",
    "Probation",
    "Readiness",
    "ShardSpec",
    "SignatureError",
    "SourceError",
    "Store",
    "StoreFull",
    "StoreUnavailable",
    "Transform",
    "ValidationError",
    "VersionConflict",
    "connect",
    "operation_retry",
    "readiness",
]
__version__ = "0.1.0"
