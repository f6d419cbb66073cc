"""The publishing side of hotswap: the ``Publisher`` API and the ``hotswap`` CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from publisher.publisher import Publisher


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): Publisher pulls in torch, which the
    # ``hotswap`` command (publisher.cli) must not pay for on --help.
    if name != "Publisher":
        raise AttributeError(f"module 'publisher' has no attribute {name!r}")
    value = importlib.import_module("publisher.publisher").Publisher
    globals()[name] = value
    return value


__all__ = ["Publisher"]
