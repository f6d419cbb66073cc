"""Re-issuing the signed head record for the current head (``Publisher.resign``).

``hotswap resign`` runs this on a schedule where agents require an expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

from hotswap import codec, headrecord
from hotswap.errors import IntegrityError, NotFound, VersionConflict
from hotswap.headrecord import HeadRecord
from hotswap.store import Store
from publisher import commit, plan
from publisher.plan import Head


def resign(store: Store, key: bytes, keys: Sequence[bytes], expiry: float) -> HeadRecord:
    """Sign head again with ``key``: same version, issued now, expiring ``expiry`` s later.

    ``keys`` are the signing keys head's manifest must verify with. See
    ``Publisher.resign`` for the errors.
    """
    number, _, record = store.head_for_commit(None)
    if number is None:
        raise NotFound(f"model {store.model!r} has no versions: no head to re-sign")
    try:
        data = store.manifest_bytes(number)
        m = store.manifest(number, keys, data)
    except (IntegrityError, NotFound) as e:
        raise type(e)(
            f"model {store.model!r}: will not re-sign head v{number}: {plan.cause(e)}; "
            "publish or roll back to put a version signed with this key on top"
        ) from e
    _check_head_is_signed_head(store, keys, number, data, record)
    head = Head(store.model, number, m, signing=True)
    issued = max(commit.now(), commit.not_before(head, record, keys))
    signed = headrecord.encode(commit.head_record(m, data, expiry, issued), key)
    if not store.replace_head_record(number, record, signed):
        raise VersionConflict(
            f"model {store.model!r}: head or its signed record changed while re-signing "
            f"v{number} (a publish, rollback or re-sign committed first); nothing "
            "written: run `hotswap resign` again"
        )
    return headrecord.decode(signed, keys=[key], expect_model=store.model)


def _check_head_is_signed_head(
    store: Store, keys: Sequence[bytes], number: int, data: bytes, record: bytes | None
) -> None:
    """Refuse to re-sign a plain head that the current signed record does not name.

    Anyone who can write Redis can move the plain ``head`` key (to a
    retracted version, say); a scheduled re-sign that signed whatever it
    says would turn that into a head every agent accepts. Only a record
    that no longer verifies (absent, or by a removed key) lets the plain
    head decide, which is how signing is turned on.
    """
    if record is None:
        return
    try:
        current = headrecord.decode(record, keys=list(keys), expect_model=store.model)
    except IntegrityError:
        return
    if current.version != number or current.manifest != codec.digest(data):
        named = f"v{current.version}" + ("" if current.version != number else " (other bytes)")
        raise VersionConflict(
            f"model {store.model!r}: head says v{number} but the signed head names {named}: "
            "someone without the signing key moved head; nothing re-signed. Put head "
            "back with `hotswap rollback` or a publish, which sign a new head"
        )
