"""The manifest: a version's complete, immutable description, and its wire form.

Pure: imports no Redis. On the wire a manifest is a msgpack *envelope*
``{"format", "body", "kid", "sig"}`` whose ``body`` holds the canonical
msgpack bytes of the fields; the HMAC-SHA256 signature covers exactly those
bytes, so verifying never depends on re-encoding.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from hotswap import codec
from hotswap.errors import ConfigError, FormatError, SignatureError, SourceError

FORMAT = 1
KINDS = ("publish", "rollback")
MAX_NDIM = 64
MAX_NAME_LEN = 1024
MAX_MESSAGE_LEN = 64 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis refuses larger values


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything a manifest declares is believed."""

    max_manifest_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 100_000
    max_tensor_bytes: int = 64 * 1024**3


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a version: where its bytes are and what they must hash to."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    chunk_bytes: int
    norm: float
    max_abs: float

    @property
    def chunks(self) -> int:
        return codec.chunk_count(self.nbytes, self.chunk_bytes)

    def same_content(self, other: TensorEntry) -> bool:
        return (self.digest, self.dtype, self.shape) == (other.digest, other.dtype, other.shape)


@dataclass(frozen=True)
class Manifest:
    """A version of a model: metadata plus every tensor's entry, sorted by name."""

    model: str
    version: int
    parent: int | None
    lineage: str
    tensors: tuple[TensorEntry, ...]
    kind: str = "publish"
    rollback_to: int | None = None
    created: float = 0.0
    author: str = ""
    message: str = ""
    key_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if names != sorted(names):
            object.__setattr__(self, "tensors", tuple(sorted(self.tensors, key=lambda t: t.name)))

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def new_lineage() -> str:
    """A random id for a fresh history (first publish into an empty keyspace)."""
    return secrets.token_hex(16)


def key_id(key: bytes) -> str:
    """A short public id of a signing key, so a verifier can say which key it lacks."""
    return hashlib.sha256(b"hotswap-key-id:" + key).hexdigest()[:16]


def _body(m: Manifest) -> dict[str, Any]:
    return {
        "model": m.model,
        "version": m.version,
        "parent": m.parent,
        "lineage": m.lineage,
        "kind": m.kind,
        "rollback_to": m.rollback_to,
        "created": float(m.created),
        "author": m.author,
        "message": m.message,
        "tensors": [
            [t.name, t.dtype, list(t.shape), t.nbytes, t.digest, t.chunk_bytes, t.norm, t.max_abs]
            for t in m.tensors
        ],
    }


def _check_encodable(m: Manifest) -> None:
    # Refuse here what decode would refuse, or a commit would make a head
    # that no agent can read.
    where = f"manifest of {m.model} v{m.version}"
    for what, text in (("message", m.message), ("author", m.author)):
        size = len(text.encode())
        if size > MAX_MESSAGE_LEN:
            raise ConfigError(f"{where}: {what} is {size} bytes, limit {MAX_MESSAGE_LEN}")
    for t in m.tensors:
        if not 0 < len(t.name) <= MAX_NAME_LEN:
            raise SourceError(
                f"{where}: tensor name {t.name[:64]!r} has {len(t.name)} characters, "
                f"need 1-{MAX_NAME_LEN}; rename it"
            )
        if len(t.shape) > MAX_NDIM:
            raise SourceError(
                f"{where}: tensor {t.name!r} has {len(t.shape)} dimensions, limit {MAX_NDIM}"
            )


def encode(m: Manifest, signing_key: bytes | None = None) -> bytes:
    """Canonical wire bytes of a manifest, signed when a key is given."""
    _check_encodable(m)
    body = msgpack.packb(_body(m), use_bin_type=True)
    envelope: dict[str, Any] = {"format": FORMAT, "body": body, "kid": None, "sig": None}
    if signing_key:
        envelope["kid"] = key_id(signing_key)
        envelope["sig"] = hmac.new(signing_key, body, hashlib.sha256).digest()
    return bytes(msgpack.packb(envelope, use_bin_type=True))


def _unpack(data: bytes, limits: Limits, what: str) -> Any:
    if len(data) > limits.max_manifest_bytes:
        raise FormatError(
            f"{what} is {len(data)} bytes, over the {limits.max_manifest_bytes} limit"
        )
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_manifest_bytes,
            max_str_len=max(MAX_MESSAGE_LEN, MAX_NAME_LEN),
            max_array_len=max(limits.max_tensors, MAX_NDIM, 16),
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception as e:
        raise FormatError(f"{what} is not valid msgpack: {type(e).__name__}: {e}") from e


def _need(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise FormatError(f"{what}: {problem}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(raw: Any, where: str, limits: Limits) -> TensorEntry:
    _need(isinstance(raw, list) and len(raw) == 8, where, "tensor entry is not an 8-field array")
    name, dtype, shape, nbytes, digest, chunk_bytes, norm, max_abs = raw
    _need(isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN, where, "bad tensor name")
    where = f"{where} tensor {name!r}"
    _need(isinstance(dtype, str) and dtype in codec.DTYPES, where, f"unknown dtype {dtype!r}")
    _need(
        isinstance(shape, list)
        and len(shape) <= MAX_NDIM
        and all(_int(d) and d >= 0 for d in shape),
        where,
        f"bad shape {shape!r}",
    )
    _need(
        _int(nbytes) and 0 <= nbytes <= limits.max_tensor_bytes,
        where,
        f"declares {nbytes!r} bytes, limit {limits.max_tensor_bytes}",
    )
    _need(
        math.prod(shape) * codec.itemsize(dtype) == nbytes,
        where,
        f"{nbytes} bytes do not match {dtype} shape {shape}",
    )
    _need(
        isinstance(digest, str)
        and len(digest) == codec.DIGEST_HEX_LEN
        and all(c in "0123456789abcdef" for c in digest),
        where,
        "bad digest",
    )
    _need(
        _int(chunk_bytes) and 0 < chunk_bytes <= MAX_CHUNK_BYTES,
        where,
        f"bad chunk size {chunk_bytes!r}",
    )
    _need(isinstance(norm, float) and isinstance(max_abs, float), where, "stats are not floats")
    return TensorEntry(name, dtype, tuple(shape), nbytes, digest, chunk_bytes, norm, max_abs)


def _optional_int(v: Any) -> bool:
    return v is None or (_int(v) and v >= 0)


def decode(
    data: bytes,
    *,
    keys: Sequence[bytes] = (),
    limits: Limits = DEFAULT_LIMITS,
    expect_model: str | None = None,
    expect_version: int | None = None,
) -> Manifest:
    """Parse and check manifest bytes; with ``keys``, require a valid signature.

    Raises FormatError for anything malformed or over the limits and
    SignatureError for a missing, unknown or wrong signature.
    """
    where = (
        "manifest" if expect_version is None else f"manifest of {expect_model} v{expect_version}"
    )
    env = _unpack(data, limits, where)
    _need(
        isinstance(env, dict) and set(env) == {"format", "body", "kid", "sig"},
        where,
        "not a manifest envelope",
    )
    _need(
        env["format"] == FORMAT,
        where,
        f"format {env['format']!r} is not supported (this hotswap reads {FORMAT}); upgrade",
    )
    body_bytes, kid, sig = env["body"], env["kid"], env["sig"]
    _need(isinstance(body_bytes, bytes), where, "body is not bytes")
    _need(kid is None or isinstance(kid, str), where, "bad key id")
    _need(sig is None or isinstance(sig, bytes), where, "bad signature field")
    if keys:
        verify_signature(body_bytes, kid, sig, keys, where)
    body = _unpack(body_bytes, limits, where)
    fields = {
        "model",
        "version",
        "parent",
        "lineage",
        "kind",
        "rollback_to",
        "created",
        "author",
        "message",
        "tensors",
    }
    _need(isinstance(body, dict) and set(body) == fields, where, "fields missing or unknown")
    _need(isinstance(body["model"], str), where, "bad model")
    _need(_int(body["version"]) and body["version"] > 0, where, "bad version")
    _need(
        _optional_int(body["parent"]) and _optional_int(body["rollback_to"]),
        where,
        "bad parent or rollback target",
    )
    _need(body["kind"] in KINDS, where, f"unknown kind {body['kind']!r}")
    _need(isinstance(body["lineage"], str) and 0 < len(body["lineage"]) <= 64, where, "bad lineage")
    _need(isinstance(body["created"], float), where, "bad creation time")
    _need(
        isinstance(body["author"], str) and isinstance(body["message"], str),
        where,
        "bad author or message",
    )
    raw_tensors = body["tensors"]
    _need(
        isinstance(raw_tensors, list) and len(raw_tensors) <= limits.max_tensors,
        where,
        f"declares more than {limits.max_tensors} tensors",
    )
    entries = tuple(_entry(raw, where, limits) for raw in raw_tensors)
    names = [e.name for e in entries]
    _need(len(set(names)) == len(names), where, "duplicate tensor names")
    m = Manifest(
        model=body["model"],
        version=body["version"],
        parent=body["parent"],
        lineage=body["lineage"],
        tensors=entries,
        kind=body["kind"],
        rollback_to=body["rollback_to"],
        created=body["created"],
        author=body["author"],
        message=body["message"],
        key_id=kid,
    )
    if expect_model is not None and m.model != expect_model:
        raise FormatError(f"{where}: belongs to model {m.model!r}")
    if expect_version is not None and m.version != expect_version:
        raise FormatError(f"{where}: says it is version {m.version}")
    return m


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


def derive(base: Manifest, **changes: Any) -> Manifest:
    """A copy of ``base`` with fields changed (tensors re-sorted)."""
    return replace(base, **changes)
