"""Keeping a model's Redis data in shape: garbage collection and verification.

The decisions are the pure functions of ``publisher.gc``; this module reads
what they need from the store and carries them out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import blake3

from hotswap import chain
from hotswap import status as st
from hotswap.candidates import History, full_stored
from hotswap.errors import ConfigError, FormatError, IntegrityError, NotFound
from hotswap.manifest import Manifest, TensorEntry
from hotswap.reconstruct import Rebuild
from hotswap.store import Store
from publisher import gc as gcplan
from publisher.reports import GcReport, Progress, VerifyReport, author


def agent_pins(store: Store) -> gcplan.Pins:
    """Versions live agents (heartbeat not expired) report running, and what hides others.

    A live agent whose record cannot be read (garbled, of the wrong type, too
    large), or records that cannot be read at all, leave its version unknown:
    gc then keeps every version rather than delete one that agent may run.
    """
    report = store.agent_report()
    versions: set[int] = set()
    unknown = list(report.problems)
    for r in report.records:
        if not r.alive:
            continue  # a dead agent runs nothing
        problem = r.problem
        if r.data is not None:
            try:
                record = st.decode(r.data)
            except FormatError as e:
                problem = str(e)
            else:
                if record.version is not None:
                    versions.add(record.version)
                continue
        unknown.append(f"agent {r.agent_id!r} is alive but its record is unreadable: {problem}")
    return gcplan.Pins(sorted(versions), unknown)


def running_versions(store: Store) -> list[int]:
    """Versions that live agents (heartbeat not expired) report running."""
    return agent_pins(store).versions


def collect(store: Store, *, keep: int, grace: float, dry_run: bool = False) -> GcReport:
    """Delete manifests beyond the newest ``keep`` (except head and versions live
    agents run), then blobs no kept version references and no publish touched
    within ``grace`` seconds."""
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1, got {keep}")
    pins = agent_pins(store)
    retention = gcplan.plan_retention(
        store.versions(), store.head(), keep, pins.versions, running_unknown=bool(pins.unknown)
    )
    kept = {v: store.manifest(v) for v in retention.keep}
    index = gcplan.split_index(store.blobs.blob_index(), store.limits.max_tensor_bytes)
    # Every blob a kept version needs to be reconstructed: its own, and its deltas'
    # chains back to a full blob (publisher.gc.needed_blobs).
    needs = gcplan.needed_blobs(kept, _older(store, retention.delete), index.valid)
    referenced = needs.blobs
    deleted = [v for v in retention.delete if v not in needs.chain_versions]
    unreferenced = sum(1 for blob in index.valid if blob not in referenced)
    candidates = gcplan.collectable(index.valid, referenced, time.time(), grace)
    if not dry_run:
        # Manifests first: a rollback to a deleted version then fails cleanly
        # instead of finding a manifest whose blobs are going.
        store.delete_manifests(deleted)
        # Re-read the scores last: a publish may have touched a candidate since.
        fresh = gcplan.rescore(candidates, store.blobs.blob_scores(candidates))
        candidates = gcplan.collectable(fresh, referenced, time.time(), grace)
    if dry_run:
        chunks, freed = 0, store.blobs.blob_bytes(candidates)
    else:
        chunks, freed = store.blobs.delete_blobs_measured(candidates)
    gone = set(candidates)
    young = [s for b, s in index.valid.items() if b not in referenced and b not in gone]
    report = GcReport(
        kept=retention.keep,
        deleted_versions=deleted,
        blobs_deleted=len(candidates),
        chunks_deleted=chunks,
        blobs_kept_young=max(0, unreferenced - len(candidates)),
        dry_run=dry_run,
        malformed_index=len(index.malformed),
        malformed_examples=index.examples(),
        pins_unknown=pins.unknown,
        chain_versions=needs.chain_versions,
        broken_chains=needs.broken,
        grace_seconds=grace,
        young_from=min(young) + grace if young else None,
        young_until=max(young) + grace if young else None,
        bytes_freed=freed,
    )
    if not dry_run:
        store.append_log(
            {
                "kind": "gc",
                "author": author(),
                "created": time.time(),
                "message": f"kept {len(report.kept)} versions"
                + (
                    f" (and {len(needs.chain_versions)} for delta chains)"
                    if needs.chain_versions
                    else ""
                )
                + f", deleted {len(report.deleted_versions)} versions and "
                f"{report.blobs_deleted} blobs",
                "versions_deleted": ",".join(map(str, report.deleted_versions)),
                "blobs_deleted": report.blobs_deleted,
            }
        )
    return report


def _older(store: Store, versions: Sequence[int]) -> Iterator[Manifest]:
    """The manifests of ``versions``, newest first, read one by one as gc asks; those
    that cannot be read lend no chain."""
    for v in sorted(versions, reverse=True):
        try:
            yield store.manifest(v)
        except (IntegrityError, NotFound):
            continue


def _stored_digest(store: Store, entry: TensorEntry, version: int) -> str:
    """BLAKE3 of a tensor's stored chunks, streamed: memory stays at one batch whatever
    the manifest declares, and a missing chunk ends the read (a forged head may
    declare 64 GiB). The batch buffer is freed on return, before the next tensor's."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for piece in store.blobs.stream(entry, version):
        hasher.update(piece)
    return str(hasher.hexdigest())


def verify(
    store: Store,
    version: int | None,
    signing_keys: Sequence[bytes] = (),
    progress: Progress | None = None,
) -> VerifyReport:
    """Re-read every blob of a version (default head) and check each tensor's bytes.

    A tensor stored as a delta is reconstructed from stored blobs alone (its
    chain back to a full blob, older versions' included) chunk by chunk, and
    every delta blob the version names is decoded and checked. Every problem
    is collected (not just the first), one reason per tensor.
    """
    started = time.monotonic()
    if version is None:
        version = store.head()
        if version is None:
            raise NotFound(f"model {store.model!r} has no versions to verify")
    m = store.manifest(version, signing_keys)
    history = History(store, m, newer_manifests(store, m, signing_keys))
    # One check per way a content is stored: tied tensors share it.
    stored = {(e.digest, e.chunk_bytes, e.nbytes, e.delta): e for e in m.tensors if e.chunks}
    total = sum(e.nbytes for e in stored.values())
    failed: dict[str, str] = {}
    done = 0
    for key, entry in stored.items():
        problem = _problem(store, m, entry, history)
        if problem:
            for other in m.tensors:
                if (other.digest, other.chunk_bytes, other.nbytes, other.delta) == key:
                    failed[other.name] = problem
        done += entry.nbytes
        if progress:
            progress("verify", done, total)
    return VerifyReport(
        version=version,
        tensors_checked=len(m.tensors),
        bytes_checked=done,
        bad=dict(sorted(failed.items())),
        seconds=time.monotonic() - started,
    )


def newer_manifests(store: Store, m: Manifest, signing_keys: Sequence[bytes]) -> list[Manifest]:
    """Manifests from head back to just after ``m`` along ``parent`` (at most
    ``chain.MAX_CHAIN``): gc may keep an old version reachable only backwards
    from a newer keyframe, which verify must be able to follow too."""
    out: list[Manifest] = []
    version = store.head()
    while version is not None and version > m.version and len(out) < chain.MAX_CHAIN:
        try:
            newer = store.manifest(version, signing_keys)
        except (NotFound, IntegrityError):
            break  # fewer routes, never a wrong one
        out.append(newer)
        version = newer.parent
    return out


def _problem(store: Store, m: Manifest, entry: TensorEntry, history: History) -> str | None:
    """Why a tensor of ``m`` cannot be read back exactly from Redis, or None.

    A full blob is hashed as streamed; a keyframe's delta is decoded back from
    it to its base; a delta alone is reconstructed (``Rebuild.check``), and its
    own blob checked where the route went another way.
    """
    rebuild = Rebuild(
        store.blobs, m, entry, history=history, where=f"model {store.model!r} v{m.version}"
    )
    ref = entry.delta
    try:
        if full_stored(entry):
            if _stored_digest(store, entry, m.version) != entry.digest:
                return "digest mismatch: the stored bytes were altered"
            rebuild.check_own_delta()
            return None
        route = rebuild.check()
        if ref is not None and ref.blob in rebuild.broken:
            return _what(rebuild.broken[ref.blob])
        if ref is not None and ref.blob not in {link.delta.blob for link in route.links}:
            rebuild.check_own_delta(route)
    except IntegrityError as e:
        # The message names model, version and tensor; keep just what went wrong.
        return _what(str(e))
    return None


def _what(message: str) -> str:
    return message.split(": ", 1)[-1]
