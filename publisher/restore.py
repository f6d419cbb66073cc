"""A rollback's target: which version it restores, and whether that version still can be.

``Publisher.rollback`` calls ``target_version`` then ``target_manifest`` and
commits the target's entries as a new version; the errors say what went and
what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from hotswap.errors import ConfigError, IntegrityError, NotFound, SignatureError
from hotswap.manifest import Manifest
from hotswap.store import Store
from publisher.plan import Head, cause


def previous(store: Store, head: Manifest) -> int:
    """The version before ``head``: its parent, or for a rollback head the newest older one."""
    if head.kind == "publish" and head.parent is not None:
        return head.parent
    older = [v for v in store.versions() if v < head.version]
    if not older:
        raise NotFound(
            f"model {store.model!r}: v{head.version} has no earlier stored version to roll back to"
        )
    return older[-1]


def target_version(store: Store, keys: Sequence[bytes], parent: Head, to: int | None) -> int:
    """The version to restore: ``to``, else the one before head (or before an untrusted head)."""
    if parent.number is None:
        raise NotFound(f"model {store.model!r} has no versions: nothing to roll back")
    head = parent.manifest
    if to is not None:
        version = int(to)
    elif head is not None:
        version = previous(store, head)
    else:
        version = _newest_trusted_before(store, keys, parent, parent.number)
    if version < 1 or version > parent.number:
        raise NotFound(f"model {store.model!r} has no version {version} (head is v{parent.number})")
    if version == parent.number and head is not None:
        raise ConfigError(
            f"model {store.model!r}: v{version} is already the head; nothing to roll back"
        )
    return version


def target_manifest(store: Store, version: int, keys: Sequence[bytes]) -> Manifest:
    """``version``'s manifest, once it verifies and every blob it names is in Redis."""
    try:
        target = store.manifest(version, keys)
    except NotFound as e:
        raise NotFound(
            f"cannot roll back model {store.model!r} to v{version}: its manifest was "
            "collected by gc (or never committed); see `hotswap log`"
        ) from e
    except SignatureError as e:
        # Agents with these keys would refuse the rolled-back tensors too.
        raise SignatureError(
            f"cannot roll back model {store.model!r} to v{version}: "
            f"{cause(e)}; agents with HOTSWAP_SIGNING_KEYS set would refuse it: "
            "publish those weights again to sign them"
        ) from e
    # Touched first so a concurrent gc's grace period protects the blobs we check.
    gone = store.blobs.missing(target.tensors, touch=True)
    if gone:
        raise NotFound(
            f"cannot roll back model {store.model!r} to v{version}: blobs of "
            f"{len(gone)} tensors (e.g. {gone[0].name!r}) were collected by gc; "
            "publish those weights again instead"
        )
    return target


def _newest_trusted_before(store: Store, keys: Sequence[bytes], head: Head, number: int) -> int:
    """The newest stored version older than untrusted head ``number`` that verifies."""
    for version in sorted((v for v in store.versions() if v < number), reverse=True):
        try:
            store.manifest(version, keys)
        except (IntegrityError, NotFound):
            continue
        return version
    raise head.refusal("no earlier stored version verifies to roll back to") from head.distrust
