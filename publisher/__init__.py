"""The publishing side of hotswap: the ``Publisher`` API and the ``hotswap`` CLI."""

from __future__ import annotations

from publisher.publisher import Publisher

__all__ = ["Publisher"]
