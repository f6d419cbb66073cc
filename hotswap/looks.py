"""The named results of the agent's looks at Redis: what to consider, what was refused.

Pure: imports no Redis. ``hotswap.lookout`` (head, notices) and
``hotswap.signedlook`` (the signed head) answer with these; the pipeline acts
on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hotswap.errors import IntegrityError
from hotswap.manifest import Manifest

# The reason key of a rejection for the signed head (not the manifest itself).
SIGNED_HEAD = "<signed head>"


@dataclass(frozen=True)
class Candidate:
    """A manifest to consider, and the BLAKE3 ``digest`` of its wire bytes.

    ``carried`` holds those bytes when a notice carried them (to ``confirm``
    against Redis before it is applied or refused). ``head`` says it is head's
    manifest: the agent converges on head's content whatever its number, while
    a manifest a notice named is only worth it when newer than what runs.
    """

    manifest: Manifest
    digest: str
    carried: bytes | None = None
    head: bool = False


@dataclass(frozen=True)
class Refused:
    """The manifest of ``version`` failed its checks (garbled, unsigned, over a limit),
    or, with signing keys, the signed head naming it did (``subject`` says which)."""

    version: int
    error: IntegrityError
    subject: str = "<manifest>"


class Quiet(enum.Enum):
    """A look that found nothing to stage."""

    NOTHING_NEW = "head has not moved, or its manifest was collected meanwhile"
    HEAD_GONE = "Redis holds no head for the model"


Look = Candidate | Refused | Quiet


class Confirmation(enum.Enum):
    """What Redis holds for a version whose manifest a notice carried."""

    CONFIRMED = "the same bytes"
    NOT_HELD = "no manifest: never committed, or collected already"
    CONTRADICTED = "another manifest: the notice lied"
