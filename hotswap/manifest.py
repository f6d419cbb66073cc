"""The manifest: a version's complete, immutable description, and its wire form.

Pure: imports no Redis. On the wire a manifest is a msgpack *envelope*
``{"format", "body", "kid", "sig"}`` whose ``body`` holds the canonical
msgpack bytes of the fields; the HMAC-SHA256 signature covers exactly those
bytes, so verifying never depends on re-encoding.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from hotswap import dtypes
from hotswap.errors import ConfigError, FormatError, SignatureError, SourceError

FORMAT = 1
KINDS = ("publish", "rollback")
MAX_NDIM = 64
MAX_NAME_LEN = 1024
MAX_MESSAGE_LEN = 64 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis refuses larger values
# The least a publish cuts (``HotswapSettings.chunk_bytes`` has this floor): a
# declared chunk size below it (unless the tensor is smaller, then one chunk)
# is refused, so a manifest costs at most nbytes / MIN_CHUNK_BYTES + 1 reads
# per tensor, whatever it declares.
MIN_CHUNK_BYTES = 4096


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

    @functools.cached_property
    def chunks(self) -> int:
        # Cached: blob checks ask every entry of a manifest on each publish.
        return dtypes.chunk_count(self.nbytes, self.chunk_bytes)

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


# msgpack builds an array by first allocating all the slots its header
# declares (up to ~80 KB a level, and 1024 levels nest), so a few KB of nested
# headers would cost tens of MB: every array unpacked here has a small length
# limit. The one long array, the tensor list, is read header first and then
# entry by entry. Maps are not preallocated; their limits only refuse junk.
_ENVELOPE_ARRAYS = 16  # the envelope holds no arrays: any is refused as "not an envelope"
_ENTRY_ARRAYS = 2 * MAX_NDIM  # an entry's 8 fields and its shape; a longer shape is a bad shape
_MAX_FIELDS = 32
_HEX_DIGEST = re.compile(f"[0-9a-f]{{{dtypes.DIGEST_HEX_LEN}}}")
_ITEMSIZE = {name: dtype.itemsize for name, dtype in dtypes.DTYPES.items()}


def _check_size(data: bytes, limits: Limits, what: str) -> None:
    if len(data) > limits.max_manifest_bytes:
        raise FormatError(
            f"{what} is {len(data)} bytes, over the {limits.max_manifest_bytes} limit"
        )


def _not_msgpack(what: str, e: Exception) -> FormatError:
    return FormatError(f"{what} is not valid msgpack: {type(e).__name__}: {e}")


def _unpack(data: bytes, limits: Limits, what: str, max_array_len: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_manifest_bytes,
            max_str_len=max(MAX_MESSAGE_LEN, MAX_NAME_LEN),
            max_array_len=max_array_len,
            max_map_len=_MAX_FIELDS,
            max_ext_len=0,
        )
    except Exception as e:
        raise _not_msgpack(what, e) from e


def _unpack_envelope(data: bytes, limits: Limits, what: str) -> Any:
    _check_size(data, limits, what)
    return _unpack(data, limits, what, _ENVELOPE_ARRAYS)


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)  # fixmap, map 16, map 32


def _is_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)  # fixarray, array 16, array 32


def _unpack_body(data: bytes, limits: Limits, what: str) -> Any:
    """The body as unpackb would return it, but with each tensor entry left as its bytes."""
    _check_size(data, limits, what)
    u = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
        max_bin_len=limits.max_manifest_bytes,
        max_str_len=max(MAX_MESSAGE_LEN, MAX_NAME_LEN),
        max_array_len=_ENTRY_ARRAYS,
        max_map_len=_MAX_FIELDS,
        max_ext_len=0,
    )
    try:
        u.feed(data)
        if not data or not _is_map(data[0]):
            body: Any = u.unpack()  # not a map: decode's field check refuses it
        else:
            fields = u.read_map_header()
            if fields > _MAX_FIELDS:
                raise ValueError(f"{fields} exceeds max_map_len({_MAX_FIELDS})")
            body = {}
            for _ in range(fields):
                key = u.unpack()
                if not isinstance(key, (str, bytes)):
                    raise ValueError(f"{type(key).__name__} is not allowed for map key")
                pos = u.tell()
                if key == "tensors" and pos < len(data) and _is_array(data[pos]):
                    count = u.read_array_header()
                    if count > limits.max_tensors:
                        raise FormatError(
                            f"{what}: declares more than {limits.max_tensors} tensors"
                        )
                    # Each entry's wire bytes: decode parses only those it has not seen.
                    entries: list[bytes] = []
                    for _ in range(count):
                        start = u.tell()
                        u.skip()
                        entries.append(data[start : u.tell()])
                    body[key] = entries
                else:
                    body[key] = u.unpack()
        if u.tell() != len(data):
            raise ValueError(f"{len(data) - u.tell()} bytes after the end")
    except FormatError:
        raise
    except Exception as e:
        raise _not_msgpack(what, e) from e
    return body


class EntryCache:
    """The entries of the last manifest decoded, by their wire bytes.

    Consecutive versions share most entries byte for byte (a delta changes a
    few tensors), and an entry's bytes decide it completely, so ``decode``
    parses and checks only the entries it has not just seen: a delta's
    manifest decodes in a fraction of the time, and that decode sits between
    a notice and the first fetch (docs/performance.md). Holds one manifest's
    entries at most.
    """

    def __init__(self) -> None:
        self._limits: Limits | None = None
        self._entries: dict[bytes, TensorEntry] = {}

    def entries(self, raws: list[bytes], limits: Limits, where: str) -> tuple[TensorEntry, ...]:
        known = self._entries if limits == self._limits else {}
        seen: dict[bytes, TensorEntry] = {}
        for raw in raws:
            entry = known.get(raw)
            if entry is None:
                entry = _entry(_unpack(raw, limits, where, _ENTRY_ARRAYS), where, limits)
            seen[raw] = entry
        self._limits, self._entries = limits, seen
        return tuple(seen.values()) if len(seen) == len(raws) else tuple(seen[r] for r in raws)


def _fail(where: str, problem: str) -> FormatError:
    return FormatError(f"{where}: {problem}")


def _need(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise FormatError(f"{what}: {problem}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dims(shape: list[Any]) -> bool:
    # A plain loop: cheaper than all() over a generator for 1-4 dims, and this
    # runs for every entry of every manifest decoded.
    # msgpack gives exact ints, so ``type(d) is int`` also refuses bools.
    for d in shape:  # noqa: SIM110
        if type(d) is not int or d < 0:
            return False
    return True


def _entry(raw: Any, where: str, limits: Limits) -> TensorEntry:
    # Called once per tensor on every manifest read: the checks are cheap and
    # messages are formatted only when one fails (docs/performance.md).
    if type(raw) is not list or len(raw) != 8:
        raise _fail(where, "tensor entry is not an 8-field array")
    name, dtype, shape, nbytes, digest, chunk_bytes, norm, max_abs = raw
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
        raise _fail(where, "bad tensor name")
    itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _fail(f"{where} tensor {name!r}", f"unknown dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_NDIM or not _dims(shape):
        raise _fail(f"{where} tensor {name!r}", f"bad shape {shape!r}")
    if type(nbytes) is not int or not 0 <= nbytes <= limits.max_tensor_bytes:
        raise _fail(
            f"{where} tensor {name!r}",
            f"declares {nbytes!r} bytes, limit {limits.max_tensor_bytes}",
        )
    if math.prod(shape) * itemsize != nbytes:
        raise _fail(
            f"{where} tensor {name!r}", f"{nbytes} bytes do not match {dtype} shape {shape}"
        )
    if type(digest) is not str or _HEX_DIGEST.fullmatch(digest) is None:
        raise _fail(f"{where} tensor {name!r}", "bad digest")
    if type(chunk_bytes) is not int or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise _fail(f"{where} tensor {name!r}", f"bad chunk size {chunk_bytes!r}")
    if chunk_bytes < MIN_CHUNK_BYTES and chunk_bytes < nbytes:
        raise _fail(
            f"{where} tensor {name!r}",
            f"chunk size {chunk_bytes} declares {dtypes.chunk_count(nbytes, chunk_bytes)} "
            f"chunks; hotswap cuts chunks of at least {MIN_CHUNK_BYTES} bytes "
            "(one chunk for a smaller tensor)",
        )
    if type(norm) is not float or type(max_abs) is not float:
        raise _fail(f"{where} tensor {name!r}", "stats are not floats")
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
    cache: EntryCache | None = None,
) -> Manifest:
    """Parse and check manifest bytes; with ``keys``, require a valid signature.

    Raises FormatError for anything malformed or over the limits and
    SignatureError for a missing, unknown or wrong signature. ``cache``
    reuses the entries of the manifest it last decoded.
    """
    where = (
        "manifest" if expect_version is None else f"manifest of {expect_model} v{expect_version}"
    )
    env = _unpack_envelope(data, limits, where)
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
    body = _unpack_body(body_bytes, limits, where)
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
    entries = (cache or EntryCache()).entries(raw_tensors, limits, where)
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
