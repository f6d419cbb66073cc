"""Fingerprints: a fast hash that tells whether a tensor's bytes changed.

A BLAKE3 digest names a blob and is what agents check, but it is several
times slower to compute than an xxh3-128 pass (docs/performance.md, change
13). A publisher that sees the same bytes again, as it does for every
unchanged tensor of a state dict it publishes over and over, finds their
digest by fingerprint instead of hashing them again.

A fingerprint never reaches Redis or an agent: it only decides which digest
the publisher writes into a manifest. An entry is learned only from bytes
shown not to change between the fingerprint and the digest (``Fingerprints``),
so a tensor written to while it was read cannot map one content's fingerprint
to another's digest. xxh3 is not a cryptographic hash; whoever could craft a
collision here controls the weights being published anyway, and agents still
check every byte against the BLAKE3 digest.
"""

from __future__ import annotations

from collections.abc import Collection

import xxhash

Fingerprint = bytes


def fingerprint(buf: bytes | bytearray | memoryview) -> Fingerprint:
    """xxh3-128 of the bytes (16 bytes)."""
    return xxhash.xxh3_128_digest(buf)


class Fingerprints:
    """The digests of contents this publisher has seen, by fingerprint.

    ``learn(fp, digest)`` only for bytes read unchanged around their digest:
    a fingerprint taken before the digest and again after it (or after the
    upload that followed it) that came out equal.
    """

    def __init__(self) -> None:
        self._digests: dict[Fingerprint, str] = {}

    def __len__(self) -> int:
        return len(self._digests)

    def digest_of(self, fp: Fingerprint) -> str | None:
        return self._digests.get(fp)

    def learn(self, fp: Fingerprint, digest: str) -> None:
        self._digests[fp] = digest

    def retain(self, digests: Collection[str]) -> None:
        """Forget every content but ``digests`` (head's, after a publish): the
        table stays the size of one version."""
        self._digests = {fp: d for fp, d in self._digests.items() if d in digests}
