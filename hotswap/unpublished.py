"""What an agent says when nothing is published under its model's name.

An agent started before the first publish serves the model's own weights and
waits; so does one whose model name is misspelled, for ever and without a
word. Once, at its first look that finds no head, the agent warns and names
the closest models published in its namespace (``hotswap.catalog`` lists
them, as ``hotswap models`` does), so a typo shows in the first log lines.
``message`` is pure; ``warning`` reads the list through the catalog.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import redis

from hotswap import catalog
from hotswap.connection import operation_retry
from hotswap.errors import HotswapError
from hotswap.store import Store

# Published names shown at most (a namespace may hold many models).
SHOWN = 5
# Model names a warning reads at most: enough for a close match, bounded however
# many marker keys the namespace holds.
LISTED = 1000


def message(model: str, published: Sequence[str] | None, ns: str) -> str:
    """The warning for ``model`` with no head; ``published``: the namespace's models
    (None: they could not be listed).

    Example:
        >>> message("minlm", ["minilm"], "hotswap")  # doctest: +NORMALIZE_WHITESPACE
        "model 'minlm': nothing is published under this name (published models: minilm);
        did you mean 'minilm'? serving the model's own weights"
    """
    start = f"model {model!r}: nothing is published under this name"
    end = "serving the model's own weights"
    if published is None:
        return f"{start} (the published models could not be listed); {end}"
    others = [n for n in published if n != model]
    if not others:
        return f"{start} (no model is published in namespace {ns!r} yet); {end}"
    shown = ", ".join(others[:SHOWN]) + (
        f" (+{len(others) - SHOWN} more)" if len(others) > SHOWN else ""
    )
    close = difflib.get_close_matches(model, others, n=3)
    guess = f" did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    return f"{start} (published models: {shown});{guess} {end}"


def warning(store: Store) -> str:
    """``message`` for ``store``'s model, listing the namespace's models through the
    catalog; a Redis user that may not list keys (an agent's ACL user has no SCAN)
    gets the message without the list."""
    try:
        # Tried once: a hint is not worth waiting out a retry budget.
        # Bounded: model names come from keys anyone with write access may create.
        published: list[str] | None = catalog.model_names(
            store.client, store.ns, operation_retry(1), limit=LISTED
        )
    except (HotswapError, redis.RedisError):
        published = None
    return message(store.model, published, store.ns)
