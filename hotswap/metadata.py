"""A version's metadata against the live model, before anything is fetched: the
entries whose dtype, shape or ties need ``validate.check_entries``, and the live
names a version covers (``validate.check_missing``). Pure: no Redis.
"""

from __future__ import annotations

from collections.abc import Iterable

from hotswap import validate
from hotswap.live import LiveModel
from hotswap.manifest import Manifest


def covered_names(m: Manifest, also: Iterable[str] = ()) -> set[str]:
    """The live names whose bytes a version gives this agent.

    ``m``'s names are live names (``intake`` mapped them); ``also`` names the
    live tensors a transform writes. Missing tensors are counted after that
    mapping, so an agent that deliberately holds a subset or a slice of a
    version is not missing anything.
    """
    return {e.name for e in m.tensors} | set(also)


def check_metadata(
    m: Manifest, live: LiveModel, policy: validate.Policy, covered: Iterable[str] = ()
) -> tuple[dict[str, list[str]], set[str]]:
    """``validate.check_entries`` over the entries that need it, and
    ``validate.check_missing``: (reasons, ignored).

    An entry with the live tensor's dtype and shape that is not tied passes
    every metadata check, so only the others are looked at (a manifest is
    mostly such entries, and this runs between a notice and the first fetch).
    """
    meta, tied = live.meta, live.tied
    # A shape decoded as anything but a tuple only takes the full check.
    suspect = [e for e in m.tensors if e.name in tied or meta.get(e.name) != (e.dtype, e.shape)]
    reasons, ignored = validate.check_entries(suspect, live.tensors, live.ties(), policy)
    # Non-persistent buffers are optional: a version from ``state_dict()`` lacks them.
    missing = validate.check_missing(covered_names(m, covered), live.required, live.ties(), policy)
    return {**reasons, **missing}, ignored
