"""Manifests an agent refused for their own bytes, known by a fingerprint: pure, no I/O.

A refused manifest is read again only once it changed. A forged head of tens
of MiB, and notices that each ask the agent to look at head again, then cost
one glance at its length and ends (``Store.head_and_glance``), not the whole
manifest each time. The start of a manifest holds its model, version,
lineage and creation time, the end its key id and signature, so a manifest
written again for real differs there; one rewritten to keep both ends and
its length stays refused until head moves, which changes no weights.

With signing keys the agent refuses the signed head record instead, and
keeps it by its bytes (``hotswap.lookout``).
"""

from __future__ import annotations

# Bytes of a manifest's start and of its end that its fingerprint holds.
EDGE = 256
# Refused versions remembered: a forger who writes more big manifests than
# this, each named by notices, costs Redis memory for each.
KEEP = 16

Fingerprint = tuple[int, bytes, bytes]


def fingerprint(data: bytes) -> Fingerprint:
    """The length and the first and last ``EDGE`` bytes of manifest bytes, as
    ``Store.head_and_glance`` reads them from Redis."""
    return len(data), data[:EDGE], data[-EDGE:]


class Refusals:
    """The newest ``KEEP`` versions refused for their manifest, by fingerprint.

    Example::

        refused = Refusals()
        refused.remember(7, data)  # decode refused these bytes
        head, glance = store.head_and_glance(7, EDGE)
        if head == 7 and refused.unchanged(7, glance):
            ...  # refused already: nothing to read
    """

    def __init__(self) -> None:
        self._refused: dict[int, Fingerprint] = {}

    def __contains__(self, version: object) -> bool:
        return version in self._refused

    def remember(self, version: int, data: bytes) -> None:
        """``data``, read as ``version``'s manifest, failed its checks."""
        self._refused.pop(version, None)
        self._refused[version] = fingerprint(data)
        while len(self._refused) > KEEP:
            del self._refused[next(iter(self._refused))]

    def forget(self, version: int) -> None:
        """``version``'s manifest passed its checks: it is no longer refused."""
        self._refused.pop(version, None)

    def unchanged(self, version: int, glance: Fingerprint) -> bool:
        """Whether Redis still holds the manifest refused as ``version``."""
        return self._refused.get(version) == glance
