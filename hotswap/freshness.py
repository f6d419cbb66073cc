"""Whether an agent with signing keys may follow a signed head record, and why not.

Pure: imports no Redis. The rules of the Update Framework's timestamp role,
applied to ``hotswap.headrecord``: an agent with signing keys follows the
signed head record, never the plain ``head`` key (anyone who can write Redis
can move that one); it applies only the manifest the record names, bytes
included (the BLAKE3 digest of its wire bytes), so metadata from different
moments cannot be mixed; it refuses a record issued before the newest it has
accepted (the ``Watermark``, kept across lineages) and, with freeze
protection, one that carries no expiry or has expired; and since a freshly
started agent has no watermark yet, it refuses a record for version N when a
signed manifest N+1 of the same lineage was created after the record was
issued (a replayed record: a commit writes manifest, head and record at once).
The threat model and what remains possible are in docs/reliability.md.

Every refusal is an ``IntegrityError`` (``SignatureError`` for a missing or
badly signed record) with one line naming the model, the version and what to
do; the agent records it as a rejection of that version and keeps serving.

Example:
    >>> heads = SignedHeads("m", [b"k" * 32])
    >>> record = headrecord.HeadRecord("m", 3, "ab" * 16, "0" * 64, issued=1000.0)
    >>> found = heads.decode(headrecord.encode(record, b"k" * 32), plain_head=3)
    >>> heads.check_fresh(found, now=1001.0)  # raises if it may not be followed
    >>> heads.accept(found)
"""

from __future__ import annotations

from collections.abc import Sequence

from hotswap import headrecord
from hotswap.errors import IntegrityError, SignatureError
from hotswap.headrecord import HeadRecord, Watermark
from hotswap.manifest import Manifest


class SignedHeads:
    """One agent's view of its model's signed head: the checks, and the watermark.

    Args:
        model: the model's name (a record of another model is refused).
        keys: the signing keys records and manifests must verify with.
        require_expiry: freeze protection (``head_require_expiry``): refuse a
            record without an expiry, or past it.
    """

    def __init__(self, model: str, keys: Sequence[bytes], require_expiry: bool = False) -> None:
        self.model = model
        self.keys = list(keys)
        self.watermark = Watermark(require_expiry)

    def decode(self, data: bytes | None, plain_head: int | None) -> HeadRecord:
        """The record in ``data``, its signature verified (not yet its freshness).

        Args:
            data: the record's bytes as Redis holds them (None: no record).
            plain_head: the plain ``head`` key, named in the error when there is no record.

        Raises:
            SignatureError: no record, or one not signed by any of ``keys``.
            FormatError: malformed, or of another model.
        """
        if data is None:
            raise SignatureError(
                f"model {self.model!r}: head v{plain_head} has no signed head record, but "
                "signing keys are configured; publish or roll back with a publisher that "
                "signs head, or run `hotswap resign`"
            )
        return headrecord.decode(data, keys=self.keys, expect_model=self.model)

    def check_fresh(self, record: HeadRecord, now: float) -> None:
        """Raise unless ``record`` may be followed at ``now`` (wall clock, for expiry).

        Raises:
            IntegrityError: issued before the watermark, or (with freeze
                protection) without expiry or expired.
        """
        refusal = self.watermark.refusal(record, now)
        if refusal is not None:
            newest = self.watermark.newest
            older = newest is not None and record.issued < newest.issued
            hint = "; if Redis was restored on purpose, re-sign head (`hotswap resign`)"
            raise IntegrityError(f"model {self.model!r}: {refusal}{hint if older else ''}")

    def check_manifest(self, record: HeadRecord, digest: str) -> None:
        """Raise unless the manifest bytes Redis holds (BLAKE3 ``digest``) are the record's.

        Raises:
            IntegrityError: another manifest under the record's version (mix-and-match).
        """
        if digest != record.manifest:
            raise IntegrityError(
                f"model {self.model!r}: the signed head names manifest {record.manifest[:16]} "
                f"as v{record.version} (lineage {record.lineage}), but Redis holds "
                f"{digest[:16]} under v{record.version}: metadata mixed from different moments "
                "or replaced; publish again or restore that version's manifest"
            )

    def unbacked(self, head: int, record: HeadRecord) -> IntegrityError:
        """The refusal of a plain head that the signed head does not name."""
        return IntegrityError(
            f"model {self.model!r}: head v{head} is not the signed head (which names "
            f"v{record.version}): moved by hand, by an intruder, or by a publisher that does "
            "not sign head; agents follow the signed head (roll back with `hotswap rollback`)"
        )

    def newer(self, record: HeadRecord, following: Manifest | None) -> bool:
        """Whether ``following`` (the verified manifest of ``record.version + 1``, None
        if absent or not verifying) shows the record to be a replay: same lineage, and
        created after the record was issued."""
        return (
            following is not None
            and following.version == record.version + 1
            and following.lineage == record.lineage
            and following.created > record.issued
        )

    def replayed(self, record: HeadRecord, following: Manifest) -> IntegrityError:
        """The refusal of a record that a newer signed manifest shows to be replayed."""
        return IntegrityError(
            f"model {self.model!r}: signed head v{record.version} was issued at "
            f"{record.issued:.3f}, but a signed v{following.version} of the same lineage was "
            f"created after it ({following.created:.3f}): a replayed head record; if Redis was "
            "restored on purpose, re-sign head (`hotswap resign`)"
        )

    def accept(self, record: HeadRecord) -> None:
        """The record was followed: nothing issued before it is accepted from now on."""
        self.watermark.accept(record)
