"""Every Redis key and channel name hotswap uses, and nothing else.

Metadata keys carry the hash tag ``{model}`` so they share one Cluster slot
(the commit script touches several); blob keys carry none so that large
tensors spread over the shards.
"""

from __future__ import annotations

import re

from hotswap.entries import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from hotswap.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_name(name: str) -> bool:
    """Whether ``name`` is valid as a model name, namespace or agent id."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str, what: str = "model name") -> str:
    """Return ``name`` if it is a valid model name or namespace, else raise ConfigError."""
    if not is_name(name):
        raise ConfigError(f"invalid {what} {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
    return name


def _meta(ns: str, model: str, suffix: str) -> str:
    return f"{check_name(ns, 'namespace')}:{{{check_name(model)}}}:{suffix}"


def seq_key(ns: str, model: str) -> str:
    return _meta(ns, model, "seq")


def head_key(ns: str, model: str) -> str:
    return _meta(ns, model, "head")


def head_record_key(ns: str, model: str) -> str:
    """The signed head record (``hotswap.headrecord``), written with head when signing."""
    return _meta(ns, model, "head:signed")


def manifest_key(ns: str, model: str, version: int) -> str:
    return _meta(ns, model, f"manifest:{int(version)}")


def manifest_pattern(ns: str, model: str) -> str:
    return _meta(ns, model, "manifest:*")


def version_from_manifest_key(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def log_key(ns: str, model: str) -> str:
    return _meta(ns, model, "log")


def agents_key(ns: str, model: str) -> str:
    """The hash of status records agents before per-agent keys wrote (read, never written)."""
    return _meta(ns, model, "agents")


def heartbeat_key(ns: str, model: str, agent_id: str) -> str:
    """One agent's heartbeat: it lives as long as the agent refreshes it."""
    return _meta(ns, model, f"agent:{check_name(agent_id, 'agent id')}")


def agent_status_key(ns: str, model: str, agent_id: str) -> str:
    """One agent's status record: a key of its own, so an ACL user can be fenced to it."""
    return _meta(ns, model, f"status:{check_name(agent_id, 'agent id')}")


def agent_status_pattern(ns: str, model: str) -> str:
    """SCAN pattern of every agent's status record of one model."""
    return _meta(ns, model, "status:*")


def agent_of_status_key(key: str) -> str:
    """The agent id a status key names, as written (checked by the caller: Redis may hold any)."""
    return key.split("}:status:", 1)[1]


def follow_key(ns: str, model: str) -> str:
    """Hash of rollout pins: ``agent:<id>`` or ``track:<name>`` -> the version that agent
    or track follows instead of head, while head is still the pin's base (``hotswap.pins``)."""
    return _meta(ns, model, "follow")


def rollout_key(ns: str, model: str) -> str:
    """The rollout record of ``hotswap rollout`` (``hotswap.rollouts``)."""
    return _meta(ns, model, "rollout")


def rollout_lease_key(ns: str, model: str) -> str:
    """Who drives the rollout now: an owner token that lives as long as its lease."""
    return _meta(ns, model, "rollout:lease")


def events_channel(ns: str, model: str) -> str:
    return _meta(ns, model, "events")


def blob_prefix(ns: str, model: str) -> str:
    return f"{check_name(ns, 'namespace')}:{check_name(model)}:blob:"


def blob_key(ns: str, model: str, digest: str, chunk_bytes: int, index: int) -> str:
    # The chunk size is part of the key: chunk I of the same bytes differs
    # between two chunk sizes, and blobs are shared across versions.
    if not _DIGEST.fullmatch(digest):
        raise ConfigError(f"invalid digest {digest!r}: expected 64 lowercase hex characters")
    return f"{blob_prefix(ns, model)}{digest}:{int(chunk_bytes)}:{int(index)}"


def chunk_keys(
    ns: str, model: str, digest: str, chunk_bytes: int, count: int, *, first: int = 0
) -> list[str]:
    """The keys of chunks ``first`` to ``count - 1`` of a blob, as ``blob_key`` names each."""
    base = blob_key(ns, model, digest, chunk_bytes, 0)[:-1]
    return [f"{base}{i}" for i in range(first, count)]


def namespace_pattern(ns: str, model: str) -> list[str]:
    """Patterns that match every key of one model (for demos and cleanup)."""
    return [
        f"{check_name(ns, 'namespace')}:{{{check_name(model)}}}:*",
        f"{blob_prefix(ns, model)}*",
    ]


# The keys whose presence makes a model exist (head, version counter, log).
_MARKERS = ("head", "seq", "log")


def model_marker_keys(ns: str, model: str) -> list[str]:
    """The keys a model exists by: head, the version counter, the log."""
    return [_meta(ns, model, suffix) for suffix in _MARKERS]


def model_marker_patterns(ns: str) -> list[str]:
    """SCAN patterns of every model's marker keys in namespace ``ns``."""
    return [f"{check_name(ns, 'namespace')}:{{*}}:{suffix}" for suffix in _MARKERS]


def model_of_marker_key(ns: str, key: str) -> str | None:
    """The model a marker key (``model_marker_keys``) names, None if ``key`` is none.

    Example:
        >>> model_of_marker_key("hotswap", "hotswap:{minilm}:head")
        'minilm'
    """
    prefix = f"{ns}:{{"
    if not key.startswith(prefix) or "}:" not in key:
        return None
    model, suffix = key[len(prefix) :].split("}:", 1)
    return model if suffix in _MARKERS and is_name(model) else None


def blob_index_key(ns: str, model: str) -> str:
    """Sorted set: blob id -> last time a publish referenced it (gc's grace clock)."""
    return _meta(ns, model, "blobs")


def blob_id(digest: str, chunk_bytes: int, chunks: int) -> str:
    return f"{digest}:{int(chunk_bytes)}:{int(chunks)}"


def _id_parts(blob: str) -> tuple[str, int, int] | None:
    parts = blob.split(":")
    # At most 20 digits: int() of a huge digit string is slow (and refused past 4300).
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 20 for p in parts[1:]):
        return None
    return parts[0], int(parts[1]), int(parts[2])


def blob_id_problem(blob: str, max_tensor_bytes: int) -> str | None:
    """Why ``blob`` is not an id a publish writes (None if it is one).

    The blob index is read from Redis, where anyone with write access may have
    put anything: an id is checked before any key list is built from it, so a
    member declaring billions of one-byte chunks costs nothing.
    """
    parts = _id_parts(blob)
    if parts is None:
        return "not digest:chunk_bytes:chunks"
    digest, chunk_bytes, chunks = parts
    if not _DIGEST.fullmatch(digest):
        return "digest is not 64 lowercase hex characters"
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        return f"chunk size {chunk_bytes} is outside {MIN_CHUNK_BYTES}-{MAX_CHUNK_BYTES}"
    if chunks < 1:
        return f"declares {chunks} chunks"
    if (chunks - 1) * chunk_bytes >= max_tensor_bytes:
        return (
            f"{chunks} chunks of {chunk_bytes} bytes exceed the {max_tensor_bytes}-byte "
            "tensor limit"
        )
    return None


def parse_blob_id(blob: str) -> tuple[str, int, int]:
    """(digest, chunk bytes, chunk count) of a blob id; check it with ``blob_id_problem`` first.

    Raises:
        ConfigError: ``blob`` is not of the form ``blob_id`` writes.
    """
    parts = _id_parts(blob)
    if parts is None:
        raise ConfigError(f"invalid blob id {blob[:160]!r}: expected digest:chunk_bytes:chunks")
    return parts


def blob_keys_of_id(ns: str, model: str, blob: str, chunks: range | None = None) -> list[str]:
    """The chunk keys of blob id ``blob`` (only the chunks in ``chunks``, if given)."""
    digest, chunk_bytes, count = parse_blob_id(blob)
    wanted = range(count) if chunks is None else range(chunks.start, min(chunks.stop, count))
    return chunk_keys(ns, model, digest, chunk_bytes, wanted.stop, first=wanted.start)
