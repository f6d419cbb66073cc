"""The signed head: which manifest is current, and how new that statement is.

Pure: imports no Redis. A manifest's signature says *who* wrote it, not *how
new* it is: a replayed signed manifest (a retracted version, or one saved
before Redis was reset) verifies as well as the current one. So a publisher
with a signing key also signs the head it commits (the Update Framework's
timestamp role): the model, the version, its lineage, the BLAKE3 digest of
the manifest's wire bytes, when it was issued and, with freeze protection,
when it expires. An agent with signing keys applies only the manifest a
valid head record names (a mix of metadata from different moments fails the
digest), never one whose record was issued before the newest it has
accepted (its *watermark*, kept across lineages, since a reset Redis forgets
version numbers but not the clock), and, where it requires expiry, never one
whose record has expired. The threat model is in docs/reliability.md.

Example:
    >>> record = HeadRecord("m", 3, "ab" * 16, "0" * 64, issued=1000.0)
    >>> data = encode(record, b"k" * 32)
    >>> decode(data, keys=[b"k" * 32], expect_model="m").version
    3
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from hotswap import dtypes
from hotswap.errors import FormatError
from hotswap.signing import key_id, verify_signature

FORMAT = 1
# A record is a few hundred bytes; anything much larger is not one.
MAX_RECORD_BYTES = 4096
_FIELDS = {"model", "version", "lineage", "manifest", "issued", "expires"}
_HEX_DIGEST = re.compile(f"[0-9a-f]{{{dtypes.DIGEST_HEX_LEN}}}")


@dataclass(frozen=True)
class HeadRecord:
    """A signed statement: ``manifest`` is the current manifest of ``model``."""

    model: str
    version: int
    lineage: str
    manifest: str  # BLAKE3 hex digest of the manifest's wire bytes
    issued: float  # the publisher's clock when it signed (seconds since the epoch)
    expires: float | None = None  # None: no freeze protection
    key_id: str | None = None

    def names(self, version: int, lineage: str, manifest_digest: str) -> bool:
        """Whether this record names exactly that manifest."""
        return (self.version, self.lineage, self.manifest) == (version, lineage, manifest_digest)


def encode(record: HeadRecord, signing_key: bytes) -> bytes:
    """The record's wire bytes, signed with ``signing_key`` (HMAC-SHA256)."""
    body = msgpack.packb(
        {
            "model": record.model,
            "version": record.version,
            "lineage": record.lineage,
            "manifest": record.manifest,
            "issued": float(record.issued),
            "expires": None if record.expires is None else float(record.expires),
        },
        use_bin_type=True,
    )
    envelope = {
        "format": FORMAT,
        "body": body,
        "kid": key_id(signing_key),
        "sig": hmac.new(signing_key, body, hashlib.sha256).digest(),
    }
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_RECORD_BYTES,
            max_str_len=256,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as e:
        raise FormatError(f"{what} is not valid msgpack: {type(e).__name__}: {e}") from e


def _time(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v >= 0


def decode(data: bytes, *, keys: list[bytes], expect_model: str) -> HeadRecord:
    """Parse a head record and verify its signature with one of ``keys``.

    Raises:
        FormatError: malformed, oversized, or of another model.
        SignatureError: unsigned, unknown key, or altered after signing.
    """
    what = f"signed head of model {expect_model!r}"
    if len(data) > MAX_RECORD_BYTES:
        raise FormatError(f"{what} is {len(data)} bytes, over the {MAX_RECORD_BYTES} limit")
    env = _unpack(data, what)
    if not (isinstance(env, dict) and set(env) == {"format", "body", "kid", "sig"}):
        raise FormatError(f"{what}: not a head record envelope")
    if env["format"] != FORMAT:
        raise FormatError(f"{what}: format {env['format']!r} is not supported; upgrade hotswap")
    body, kid, sig = env["body"], env["kid"], env["sig"]
    if not isinstance(body, bytes) or not (kid is None or isinstance(kid, str)):
        raise FormatError(f"{what}: bad body or key id")
    if not (sig is None or isinstance(sig, bytes)):
        raise FormatError(f"{what}: bad signature field")
    verify_signature(body, kid, sig, keys, what)
    raw = _unpack(body, what)
    if not (isinstance(raw, dict) and set(raw) == _FIELDS):
        raise FormatError(f"{what}: fields missing or unknown")
    version = raw["version"]
    if not (isinstance(version, int) and not isinstance(version, bool) and version > 0):
        raise FormatError(f"{what}: bad version")
    lineage, digest = raw["lineage"], raw["manifest"]
    if not (isinstance(lineage, str) and 0 < len(lineage) <= 64):
        raise FormatError(f"{what}: bad lineage")
    if not (isinstance(digest, str) and _HEX_DIGEST.fullmatch(digest)):
        raise FormatError(f"{what}: bad manifest digest")
    if not _time(raw["issued"]) or not (raw["expires"] is None or _time(raw["expires"])):
        raise FormatError(f"{what}: bad issue or expiry time")
    if raw["model"] != expect_model:
        raise FormatError(f"{what}: belongs to model {raw['model']!r}")
    return HeadRecord(
        raw["model"], version, lineage, digest, raw["issued"], raw["expires"], key_id=kid
    )


class Watermark:
    """The newest head record an agent accepted: nothing older is accepted after it.

    Kept in the agent's memory across lineages (a Redis reset does not lower
    it). ``require_expiry`` is freeze protection: a record must carry an
    expiry that has not passed.
    """

    def __init__(self, require_expiry: bool = False) -> None:
        self.require_expiry = require_expiry
        self.newest: HeadRecord | None = None

    def refusal(self, record: HeadRecord, now: float) -> str | None:
        """Why ``record`` must not be accepted now, or None if it may be."""
        newest = self.newest
        if newest is not None and record.issued < newest.issued:
            return (
                f"signed head v{record.version} (lineage {record.lineage}) was issued at "
                f"{record.issued:.3f}, before v{newest.version} (lineage {newest.lineage}) "
                f"accepted at {newest.issued:.3f}: a replayed or rolled-back head"
            )
        if self.require_expiry:
            if record.expires is None:
                return (
                    f"signed head v{record.version} carries no expiry, but this agent requires "
                    "one (HOTSWAP_HEAD_REQUIRE_EXPIRY); set HOTSWAP_HEAD_EXPIRY_SECONDS on "
                    "publishers and re-sign with `hotswap resign`"
                )
            if now > record.expires:
                return (
                    f"signed head v{record.version} expired at {record.expires:.3f} (now "
                    f"{now:.3f}): Redis may be frozen or replayed, or no publisher re-signed "
                    "it (`hotswap resign`)"
                )
        return None

    def accept(self, record: HeadRecord) -> None:
        """Raise the watermark to ``record`` (after ``refusal`` returned None)."""
        if self.newest is None or record.issued >= self.newest.issued:
            self.newest = record
