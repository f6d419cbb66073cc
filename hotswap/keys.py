"""Every Redis key and channel name hotswap uses, and nothing else.

Metadata keys carry the hash tag ``{model}`` so they share one Cluster slot
(the commit script touches several); blob keys carry none so that large
tensors spread over the shards.
"""

from __future__ import annotations

import re

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
    return _meta(ns, model, "agents")


def heartbeat_key(ns: str, model: str, agent_id: str) -> str:
    return _meta(ns, model, f"agent:{check_name(agent_id, 'agent id')}")


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


def chunk_keys(ns: str, model: str, digest: str, chunk_bytes: int, count: int) -> list[str]:
    """The keys of a blob's ``count`` chunks, as ``blob_key`` names each (checked once)."""
    base = blob_key(ns, model, digest, chunk_bytes, 0)[:-1]
    return [f"{base}{i}" for i in range(count)]


def namespace_pattern(ns: str, model: str) -> list[str]:
    """Patterns that match every key of one model (for demos and cleanup)."""
    return [
        f"{check_name(ns, 'namespace')}:{{{check_name(model)}}}:*",
        f"{blob_prefix(ns, model)}*",
    ]


def blob_index_key(ns: str, model: str) -> str:
    """Sorted set: blob id -> last time a publish referenced it (gc's grace clock)."""
    return _meta(ns, model, "blobs")


def blob_id(digest: str, chunk_bytes: int, chunks: int) -> str:
    return f"{digest}:{int(chunk_bytes)}:{int(chunks)}"


def blob_keys_of_id(ns: str, model: str, blob: str) -> list[str]:
    digest, chunk_bytes, chunks = blob.split(":")
    return chunk_keys(ns, model, digest, int(chunk_bytes), int(chunks))
