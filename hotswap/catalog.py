"""Redis I/O over a namespace's models: which exist, what each holds, deleting one.

A model exists while any of its head, version counter or log keys does
(``keys.model_marker_keys``): a model whose first publish failed has a
counter and no versions, and says so rather than being unknown. Blobs are
per model (their keys name it, ``keys.blob_prefix``), so deleting a model
deletes every blob it has and no other model's. Reads SCAN, never KEYS.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tenacity

from hotswap import keys
from hotswap.connection import RedisClient, guarded
from hotswap.errors import NotFound
from hotswap.store import Store

# Keys a pipeline asks the size of at once.
BATCH = 1000


@dataclass(frozen=True)
class Footprint:
    """What one model holds in Redis: blob chunks and their bytes, and every other key."""

    chunks: int
    blob_bytes: int
    other_keys: int


def model_names(
    client: RedisClient, ns: str, retrying: tenacity.Retrying, limit: int | None = None
) -> list[str]:
    """Every model of namespace ``ns`` that has a head, a version counter or a log;
    with ``limit``, at most that many (a hint need not hold a keyspace of them)."""
    return guarded(retrying, "*", "listing models", lambda: _scan_models(client, ns, limit))


def _scan_models(client: RedisClient, ns: str, limit: int | None = None) -> list[str]:
    found: set[str] = set()
    for pattern in keys.model_marker_patterns(ns):
        for key in client.scan_iter(match=pattern, count=BATCH):
            name = keys.model_of_marker_key(ns, _text(key))
            if name is not None:
                found.add(name)
                if limit is not None and len(found) >= limit:
                    return sorted(found)
    return sorted(found)


def exists(store: Store) -> bool:
    """Whether ``store``'s model has a head, a version counter or a log in Redis."""
    names = keys.model_marker_keys(store.ns, store.model)
    return bool(store.call("looking the model up", lambda: store.client.exists(*names)))


def require(store: Store) -> None:
    """Raise NotFound, naming the closest models, unless ``store``'s model exists.

    Raises:
        NotFound: e.g. ``model 'minlm' is not in Redis (namespace 'hotswap'); did
            you mean 'minilm'?; `hotswap models` lists the models there``.
    """
    if exists(store):
        return
    known = store.call("listing models", lambda: _scan_models(store.client, store.ns))
    close = difflib.get_close_matches(store.model, known, n=3)
    hint = f"; did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    raise NotFound(
        f"model {store.model!r} is not in Redis (namespace {store.ns!r}){hint}; "
        "`hotswap models` lists the models there"
    )


def footprint(store: Store) -> Footprint:
    """The model's blob chunks (count and bytes, asked of Redis) and its other keys."""
    meta, blobs = keys.namespace_pattern(store.ns, store.model)

    def measure() -> Footprint:
        chunks = size = 0
        for batch in _batches(store.client.scan_iter(match=blobs, count=BATCH)):
            pipe = store.client.pipeline(transaction=False)
            for key in batch:
                pipe.strlen(key)
            lengths = pipe.execute()
            chunks += len(batch)
            size += sum(n for n in lengths if type(n) is int)
        other = sum(1 for _ in store.client.scan_iter(match=meta, count=BATCH))
        return Footprint(chunks, size, other)

    return store.call("measuring the model", measure)


def delete_model(store: Store) -> int:
    """Delete every key of ``store``'s model, head first; returns how many went.

    Head, its signed record and the version counter go first, in one call: a
    publish in flight then fails its commit (head moved) instead of making
    a version over deleted blobs, and agents find no head. Then everything
    else the model's key patterns match, its blobs included.
    """
    first = [keys.head_key(store.ns, store.model), keys.head_record_key(store.ns, store.model)]
    first.append(keys.seq_key(store.ns, store.model))
    n = int(store.call("deleting the model's head", lambda: store.client.unlink(*first)))
    return n + store.delete_all()


def _batches(found: Iterator[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for key in found:
        batch.append(key)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _text(key: bytes | str) -> str:
    return key.decode(errors="backslashreplace") if isinstance(key, bytes) else key
