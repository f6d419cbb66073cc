"""What an agent ran before: per live tensor name, the digests of the last few contents.

Imports no Redis; pure bookkeeping. The relative checks (norm ratio, relative
change) guard against a sudden jump away from what runs, and cannot tell a
jump from a return: a rollback to a checkpoint whose bias was all zeros has a
norm ratio of 0 and would be refused for ever, a one-way door. Content this
agent validated and ran before is no jump into the unknown, so for it those
checks are skipped (``valuecheck.check_staged``); the finite, dtype and shape
checks and the user's validators still run. Memory is per process: a
restarted agent remembers nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Contents remembered per tensor name, most recent first: enough to go back a
# few versions, bounded so a long-running agent's memory does not grow.
KEEP = 4


class RanBefore:
    """The digests of content an agent applied, the last ``keep`` per tensor name.

    Example:
        >>> ran = RanBefore(keep=2)
        >>> ran.record({"fc.bias": "a"}); ran.record({"fc.bias": "b"})
        >>> ran.record({"fc.bias": "c"})
        >>> ran.seen("fc.bias", "b"), ran.seen("fc.bias", "a")
        (True, False)
    """

    def __init__(self, keep: int = KEEP, seen: Mapping[str, tuple[str, ...]] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.keep = keep
        self._seen: dict[str, tuple[str, ...]] = dict(seen or {})

    def seen(self, name: str, digest: str) -> bool:
        """Whether ``digest`` is one of the last contents that ran under ``name``."""
        return digest in self._seen.get(name, ())

    def record(self, digests: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
        """Remember ``{name: digest}`` as content that runs now (validated and applied)."""
        items = digests.items() if isinstance(digests, Mapping) else digests
        for name, digest in items:
            before = self._seen.get(name, ())
            if before[:1] == (digest,):
                continue
            kept = (digest, *(d for d in before if d != digest))
            self._seen[name] = kept[: self.keep]

    def copy(self) -> RanBefore:
        """A snapshot that later ``record`` calls on this one do not change."""
        return RanBefore(self.keep, self._seen)
