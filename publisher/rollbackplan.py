"""What a rollback commits, worked out before it writes: the target and what the log says.

``Publisher.rollback`` reads head, calls ``prepare`` and commits the
``Change`` (the target's entries as a new version); ``publisher.restore`` chooses the target and
checks that it can still be restored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hotswap.store import Store
from publisher import plan, restore
from publisher.commit import Change
from publisher.plan import Head
from publisher.reports import describe

log = logging.getLogger("hotswap.publisher")


def prepare(
    store: Store, keys: Sequence[bytes], parent: Head, to: int | None, message: str
) -> Change:
    """The rollback from head ``parent`` to ``to`` (None: the default target), with
    ``message`` (default "rollback to vN", plus what the default target skipped)."""
    chosen = restore.target_version(store, keys, parent, to)
    target = restore.target_manifest(store, chosen.version, keys)
    default = f"rollback to v{chosen.version}"
    if chosen.skipped:
        default += f" (skipped {describe(chosen.skipped)})"
        log.info("model %r: %s", store.model, default)
    head = parent.manifest
    return Change(
        entries=target.tensors,
        kind="rollback",
        message=message or default,
        changed=plan.diff(head.tensors if head else (), target.tensors).count,
        rollback_to=target.version,
        # An untrusted head's lineage is not taken: the target's is verified.
        lineage=target.lineage if head is None else None,
        skipped=chosen.skipped,
    )
