"""What ``hotswap models`` and ``hotswap delete`` show of a model: its versions and sizes.

``row`` reads one model (through ``hotswap.catalog`` and its ``Store``);
``table`` and ``describe`` draw rows. A head whose manifest cannot be read
leaves its tensors and size unknown (None) instead of failing the listing.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from hotswap import catalog
from hotswap.connection import RedisClient, retry_from_settings
from hotswap.errors import IntegrityError, NotFound
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import views
from publisher.render import plain, size


def row(store: Store) -> dict[str, Any]:
    """One model: head, stored versions, head's tensors and bytes, what Redis holds, live agents.

    ``stored_bytes`` counts the blob chunks' bytes (every version's content,
    deltas included, each blob once); ``model_bytes`` is head's tensors' size.
    """
    head = store.head()
    tensors = model_bytes = None
    if head is not None:
        try:
            m = store.manifest(head)
            tensors, model_bytes = len(m.tensors), m.nbytes
        except (IntegrityError, NotFound):
            pass  # shown as unknown: `hotswap show` says why
    used = catalog.footprint(store)
    # Stopped agents' heartbeats outlive them by their ttl: not live (``status.live``).
    live = sum(1 for _, alive in views.agent_statuses(store) if alive)
    return {
        "model": store.model,
        "head": head,
        "versions": len(store.versions()),
        "tensors": tensors,
        "model_bytes": model_bytes,
        "stored_bytes": used.blob_bytes,
        "blob_chunks": used.chunks,
        "other_keys": used.other_keys,
        "live_agents": live,
    }


def rows(client: RedisClient, settings: HotswapSettings) -> list[dict[str, Any]]:
    """A row per model of the settings' namespace, by name."""
    names = catalog.model_names(client, settings.namespace, retry_from_settings(settings))
    return [row(Store.from_settings(client, name, settings)) for name in names]


def table(namespace: str, found: list[dict[str, Any]]) -> Table:
    """The models as a table (empty: a caption says so)."""
    t = Table(
        title=plain(f"models in namespace {namespace}"),
        caption=None if found else "no models (nothing published under this namespace)",
    )
    for col in ("model", "head", "versions", "tensors", "model size", "stored", "live agents"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in found:
        t.add_row(
            plain(r["model"]),
            "-" if r["head"] is None else f"v{r['head']}",
            str(r["versions"]),
            "-" if r["tensors"] is None else str(r["tensors"]),
            size(r["model_bytes"]),
            size(r["stored_bytes"]),
            str(r["live_agents"]),
        )
    return t


def describe(r: dict[str, Any]) -> str:
    """A model in one phrase, for the question ``delete`` asks and its answer.

    Example:
        >>> describe({"model": "m", "head": 3, "versions": 2, "stored_bytes": 2_000_000,
        ...           "live_agents": 0})
        "model 'm' (head v3, 2 versions stored, 2.0 MB of blobs, 0 live agents)"
    """
    head = "no head" if r["head"] is None else f"head v{r['head']}"
    agents = r["live_agents"]
    live = f"{agents} live agent{'' if agents == 1 else 's'}"
    if agents:
        live += ": they keep serving what they run, and find no head"
    return (
        f"model {r['model']!r} ({head}, {r['versions']} versions stored, "
        f"{size(r['stored_bytes'])} of blobs, {live})"
    )
