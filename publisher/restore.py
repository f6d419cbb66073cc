"""A rollback's target: which version it restores, and whether that version still can be.

``Publisher.rollback`` calls ``target_version`` then ``target_manifest`` and
commits the target's entries as a new version; the errors say what went and
what to do.

The default target is the newest earlier version that is still stored,
verifies, was not retracted, differs from head, was rejected by no agent and
is what agents applied. Agents' status records tell the last two
(``publisher.fleet``): a version any agent rejected is passed over, and where
live agents run versions older than head, a version none of them runs is
passed over too ("not applied by any agent"), so a rollback after a run of
rejected versions lands on what the fleet last ran. Where no live agent runs
an older version (all run head, or none reports yet) the newest version that
passes the other tests is taken. A rollback manifest
(parent P, ``rollback_to`` T) retracts every version in (T, P]: those were
rolled back for a reason, so a second ``rollback`` goes past them instead of
back to the bad version the first one left; a rollback that agents rejected
and no live agent runs retracts nothing (it never took). A version holding head's very
tensors would change nothing and is passed over too. What was passed over,
and why, is reported (``Target.skipped``, ``describe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hotswap.errors import ConfigError, IntegrityError, NotFound, SignatureError
from hotswap.manifest import Manifest
from hotswap.store import Store
from publisher import fleet, plan
from publisher.plan import Head, cause
from publisher.promote import HeadChain
from publisher.reports import describe


@dataclass(frozen=True)
class Target:
    """The version a rollback restores, and the newer ones a default target passed over."""

    version: int
    skipped: dict[int, str] = field(default_factory=dict)  # version -> why, newest first


def _retract(m: Manifest, retracted: dict[int, int], agents: fleet.Fleet) -> None:
    """Record the versions rollback ``m`` retracted (those in (rollback_to, parent]).

    A rollback that agents rejected and no live agent runs retracts nothing:
    it never took, and what it meant to retract may be what the fleet runs.
    """
    if m.kind != "rollback" or m.rollback_to is None or m.parent is None:
        return
    if m.version in agents.rejected and m.version not in agents.running:
        return
    for version in range(m.rollback_to + 1, m.parent + 1):
        retracted.setdefault(version, m.version)


def target_version(store: Store, keys: Sequence[bytes], parent: Head, to: int | None) -> Target:
    """The version to restore: ``to``, else the default (see the module docstring)."""
    if parent.number is None:
        raise NotFound(f"model {store.model!r} has no versions: nothing to roll back")
    head = parent.manifest
    if to is None:
        return default_target(store, keys, parent, parent.number)
    version = int(to)
    if version < 1 or version > parent.number:
        raise NotFound(f"model {store.model!r} has no version {version} (head is v{parent.number})")
    if version == parent.number and head is not None:
        raise ConfigError(
            f"model {store.model!r}: v{version} is already the head; nothing to roll back"
        )
    if head is not None and _same_weights(store, keys, head, version):
        # A version equal to head would change nothing an agent serves.
        raise ConfigError(
            f"model {store.model!r}: head v{parent.number} already holds v{version}'s weights; "
            "nothing to roll back"
        )
    return Target(version)


def _same_weights(store: Store, keys: Sequence[bytes], head: Manifest, version: int) -> bool:
    """Whether ``version`` holds head's very tensors (unreadable: no; ``target_manifest``
    then says why it cannot be restored)."""
    try:
        m = store.manifest(version, keys)
    except (NotFound, IntegrityError):
        return False
    return plan.diff(head.tensors, m.tensors).count == 0


def default_target(store: Store, keys: Sequence[bytes], parent: Head, number: int) -> Target:
    """The newest stored version older than head ``number`` that verifies, was not
    retracted by a rollback, holds other tensors than head (whose manifest is
    ``parent.manifest``; an untrusted head: any version that verifies), was
    rejected by no agent and, where agents run earlier versions, one of those."""
    head = parent.manifest
    retracted: dict[int, int] = {}
    agents = fleet.read(store, None if head is None else head.lineage)
    if head is not None:
        _retract(head, retracted, agents)
    # Never head (published with promote=False, never promoted; issue 17): not
    # a version to go back to, and a canary running one says nothing of the fleet.
    chain = HeadChain(store, head)
    # Applied: some live agent runs it. Where none runs an earlier version (all
    # run head, or nothing yet) that says nothing of the others: not asked.
    ask_applied = any(v < number and not chain.never_head(v) for v in agents.running)
    skipped: dict[int, str] = {}
    for version in sorted((v for v in store.versions() if v < number), reverse=True):
        try:
            m = store.manifest(version, keys)
        except NotFound:
            continue  # collected since it was listed
        except IntegrityError as e:
            skipped[version] = f"does not verify ({cause(e)})"
            continue
        if chain.never_head(version):
            skipped[version] = "never head (published without promotion)"
        elif version in retracted:
            skipped[version] = f"retracted by v{retracted[version]}"
        elif head is not None and plan.diff(head.tensors, m.tensors).count == 0:
            skipped[version] = f"holds what v{number} holds"
        elif version in agents.rejected:
            skipped[version] = f"rejected by {fleet.agents(agents.rejected[version])}"
        elif ask_applied and version not in agents.running:
            skipped[version] = "not applied by any agent"
        else:
            return Target(version, skipped)
        _retract(m, retracted, agents)
    if head is None:
        raise parent.refusal("no earlier stored version verifies to roll back to") from (
            parent.distrust
        )
    if not skipped:
        raise NotFound(
            f"model {store.model!r}: v{number} has no earlier stored version to roll back to"
        )
    raise NotFound(
        f"model {store.model!r}: no earlier version to roll back to from v{number} "
        f"(skipped {describe(skipped)}); pass --to VERSION (to=...) to pick one"
    )


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
