"""The norms of the bytes an agent runs, where a trusted manifest states them.

Validation compares a new tensor's norm with the live one's. Knowing the live
norm saves a pass over the live tensor, but a norm is only known when the
agent can trust it: see ``RunningNorms.learn``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hotswap.manifest import Manifest, TensorEntry
from hotswap.validate import Policy


class RunningNorms:
    """The known norm of each live tensor, keyed to the digest of the bytes it describes.

    Not thread-safe: the agent calls it with its condition held.
    """

    def __init__(self, policy: Policy) -> None:
        # name -> (digest, norm): the norm of those bytes as a manifest states it.
        self._norms: dict[str, tuple[str, float]] = {}
        self._checks_norm: dict[str, bool] = {}
        self._policy = policy

    def known(self, digests: Mapping[str, str]) -> dict[str, float]:
        """Norms of the live tensors (name -> digest that runs) where known."""
        known: dict[str, float] = {}
        for name, runs in digests.items():
            seen = self._norms.get(name)
            if seen is not None and seen[0] == runs:
                known[name] = seen[1]
        return known

    def learn(self, m: Manifest, digests: Mapping[str, str]) -> None:
        """Learn the norms ``m`` states for bytes that run as they are.

        A norm is known for bytes this agent applied with the norm check on,
        or whose digest equals the entry of a manifest it read from Redis (the
        entry's stats describe those very bytes; a manifest lying about them
        lies about its own content), where the policy checks that name's norm.
        """
        for entry in m.tensors:
            runs = digests.get(entry.name)
            if runs != entry.digest:
                continue
            seen = self._norms.get(entry.name)
            if (seen is None or seen[0] != runs) and self._checked(entry.name):
                self._norms[entry.name] = (entry.digest, entry.norm)

    def applied(self, changed: Mapping[str, TensorEntry], checked: Mapping[str, float]) -> None:
        """Record a version's ``changed`` tensors as applied; ``checked`` holds the
        norms validation checked against the fetched bytes (the others are unknown)."""
        for name, entry in changed.items():
            if name in checked:
                self._norms[name] = (entry.digest, checked[name])
            else:
                self._norms.pop(name, None)

    def snapshot(self, names: Iterable[str]) -> dict[str, tuple[str, float] | None]:
        """What is known of ``names`` now, for ``restore`` (a revert)."""
        return {name: self._norms.get(name) for name in names}

    def restore(self, snapshot: Mapping[str, tuple[str, float] | None]) -> None:
        """Put back what ``snapshot`` knew of its names."""
        for name, seen in snapshot.items():
            if seen is None:
                self._norms.pop(name, None)
            else:
                self._norms[name] = seen

    def _checked(self, name: str) -> bool:
        """Whether the policy checks this name's norm (where it does not, no norm is trusted)."""
        checked = self._checks_norm.get(name)
        if checked is None:
            checked = self._checks_norm[name] = self._policy.rules_for(name).check_norm
        return checked
