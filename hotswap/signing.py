"""Signing metadata: HMAC-SHA256 over exact bytes, with a public id for each key.

Pure: imports no Redis. Manifests and the signed head record are signed the
same way: the signature covers exactly the body bytes, so verifying never
depends on re-encoding. Any key in ``HOTSWAP_SIGNING_KEYS`` verifies
(rotation); the first one signs.

Example:
    >>> kid, sig = sign(b"body", b"k" * 32)
    >>> verify_signature(b"body", kid, sig, [b"k" * 32], "manifest of m v1")
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from hotswap.errors import SignatureError


def key_id(key: bytes) -> str:
    """A short public id of a signing key, so a verifier can say which key it lacks."""
    return hashlib.sha256(b"hotswap-key-id:" + key).hexdigest()[:16]


def sign(body: bytes, key: bytes) -> tuple[str, bytes]:
    """The key id and HMAC-SHA256 of ``body`` with ``key``."""
    return key_id(key), hmac.new(key, body, hashlib.sha256).digest()


def verify_signature(
    body: bytes, kid: str | None, sig: bytes | None, keys: Iterable[bytes], where: str
) -> None:
    """Raise SignatureError unless ``sig`` is a valid HMAC of ``body`` by one of ``keys``."""
    if sig is None:
        raise SignatureError(
            f"{where} is unsigned, but signing keys are configured; "
            "publish with HOTSWAP_SIGNING_KEYS set"
        )
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(kid or "")
    if key is None:
        raise SignatureError(
            f"{where} is signed with unknown key id {kid!r}; add that key to HOTSWAP_SIGNING_KEYS"
        )
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), sig):
        raise SignatureError(
            f"{where} has a bad signature (key id {kid}): it was altered after signing"
        )
