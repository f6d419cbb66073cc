"""The ``Publisher``: turns state dicts and checkpoints into versions in Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from types import TracebackType

from hotswap import keys
from hotswap import manifest as mf
from hotswap import notice as nt
from hotswap.connection import RedisClient, connect
from hotswap.errors import (
    ConfigError,
    HotswapError,
    IntegrityError,
    NotFound,
    SignatureError,
    SourceError,
)
from hotswap.manifest import Manifest, TensorEntry
from hotswap.settings import HotswapSettings
from hotswap.settings import load as load_settings
from hotswap.store import Store
from publisher import plan, upkeep, upload
from publisher.fingerprint import Fingerprints
from publisher.plan import Head, cause
from publisher.reports import GcReport, Progress, PublishReport, VerifyReport, author
from publisher.sources import Source, open_source

__all__ = ["GcReport", "Progress", "PublishReport", "Publisher", "VerifyReport"]

log = logging.getLogger("hotswap.publisher")


class Publisher:
    """Publishes versions of one model, rolls back, collects garbage and verifies.

    Tied or shared tensors (two names over one storage, e.g. an embedding tied
    to the output layer) are published on purpose as two manifest entries that
    point at the same blobs: the bytes are hashed once and uploaded once, and
    an agent copies the same bytes into both names. Any two tensors with equal
    bytes, dtype and shape share blobs the same way, across versions too.

    Args:
        model_name: the model's name in Redis (``[A-Za-z0-9._-]{1,128}``).
        settings: defaults to ``HotswapSettings()`` (``HOTSWAP_*`` env, ``.env``).
        connection: a redis client to use; made from the settings when None
            (and then closed by ``close()``).
    """

    def __init__(
        self,
        model_name: str,
        settings: HotswapSettings | None = None,
        connection: RedisClient | None = None,
    ) -> None:
        self.model = keys.check_name(model_name)
        self.settings = settings or load_settings()
        self._owns_client = connection is None
        self.client = connect(self.settings) if connection is None else connection
        self.store = Store.from_settings(self.client, self.model, self.settings)
        keys_ = self.settings.key_bytes()
        self._keys = keys_
        self._signing_key = keys_[0] if keys_ else None
        self._last: PublishReport | None = None
        # Digests of contents this publisher read, by fingerprint (publisher.fingerprint).
        self._fingerprints = Fingerprints()

    @property
    def last_report(self) -> PublishReport:
        """The report of the last ``publish`` or ``rollback`` of this publisher."""
        if self._last is None:
            raise HotswapError(f"model {self.model!r}: nothing published by this Publisher yet")
        return self._last

    # -- publish ----------------------------------------------------------------

    def publish(
        self,
        source: Source,
        message: str = "",
        only: Sequence[str] | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> int:
        """Publish ``source`` as a new version and return its number.

        Only tensors whose bytes are not already in Redis are uploaded. When
        nothing changed since head (and not ``force``) no version is created
        and the head's number is returned. With ``only`` (globs), just the
        matching tensors are read and the rest are inherited from head.

        A head whose manifest cannot be trusted (unsigned while signing keys
        are set, forged, garbled, missing) gives a full publish only its number
        as the parent: every tensor is hashed and counted as changed, and the
        log entry says why (``untrusted_parent``). ``only`` refuses such a head.
        """
        started = time.monotonic()
        if len(message) > mf.MAX_MESSAGE_LEN:
            raise ConfigError(f"message is {len(message)} characters, limit {mf.MAX_MESSAGE_LEN}")
        with open_source(source) as src:
            names = plan.select(src.names, only, src.where)
            head = self._head()
            if only is not None and head.number is None:
                raise ConfigError(
                    f"model {self.model!r} has no version yet: --only needs a parent to inherit "
                    "the other tensors from; publish the whole model first"
                )
            if only is not None and head.manifest is None:
                raise head.refusal("--only inherits the other tensors from it") from head.distrust
            trusted = head.manifest
            hashed = upload.hash_entries(
                src, names, trusted, self.settings, progress=progress, memo=self._fingerprints
            )
            fresh, pending = hashed.entries, hashed.pending
            entries = plan.merge(trusted.tensors, fresh) if trusted and only is not None else fresh
            if len(entries) > self.settings.max_tensors:
                raise SourceError(
                    f"{src.where}: {len(entries)} tensors, over the limit of "
                    f"{self.settings.max_tensors} (HOTSWAP_MAX_TENSORS)"
                )
            stored = trusted.tensors if trusted else ()
            sent, stats = upload.upload_missing(
                self.store,
                src,
                entries,
                stored,
                pending=pending,
                progress=progress,
                prints=hashed.fingerprints,
                memo=self._fingerprints,
            )
            entries = upload.with_stats(src, entries, pending, stats)
        self._fingerprints.retain({e.digest for e in entries})
        # An untrusted head is compared with nothing: every tensor counts as new.
        changes = plan.diff(trusted.tensors if trusted else (), entries)
        if trusted is not None and changes.count == 0 and not force:
            self._last = PublishReport(
                version=trusted.version,
                parent=trusted.parent,
                created=False,
                tensors_total=len(entries),
                tensors_changed=0,
                bytes_total=trusted.nbytes,
                bytes_uploaded=sent,
                bytes_skipped=trusted.nbytes - sent,
                seconds=time.monotonic() - started,
            )
            return trusted.version
        return self._commit(
            head=head,
            entries=entries,
            kind="publish",
            rollback_to=None,
            message=message,
            changed=changes.count,
            sent=sent,
            started=started,
        )

    def _head(self) -> Head:
        """The head's number and, if it verifies (with the signing keys), its manifest."""
        guess = self._last.version if self._last is not None else None
        number, data = self.store.head_and_manifest_bytes(guess)
        signing = bool(self._keys)
        if number is None:
            return Head(self.model, None, signing=signing)
        try:
            manifest = self.store.manifest(number, self._keys, data)
            return Head(self.model, number, manifest, None, signing)
        except (IntegrityError, NotFound) as e:
            # Unsigned (signing just turned on), forged, garbled or missing: a full
            # publish may still go on top of it, taking nothing from it but its number.
            return Head(self.model, number, None, e, signing)

    def _commit(
        self,
        *,
        head: Head,
        entries: Sequence[TensorEntry],
        kind: str,
        rollback_to: int | None,
        message: str,
        changed: int,
        sent: int,
        started: float,
        lineage: str | None = None,
    ) -> int:
        version = self.store.reserve_version()
        if lineage is None:
            lineage = head.manifest.lineage if head.manifest else self._lineage(head)
        m = Manifest(
            model=self.model,
            version=version,
            parent=head.number,
            lineage=lineage,
            tensors=tuple(entries),
            kind=kind,
            rollback_to=rollback_to,
            created=time.time(),
            author=author(),
            message=message,
        )
        data = mf.encode(m, self._signing_key)
        fields: dict[str, str | int | float] = {
            "version": version,
            "kind": kind,
            "author": m.author,
            "created": m.created,
            "message": message,
            "tensors_changed": changed,
            "bytes_uploaded": sent,
            "bytes_total": m.nbytes,
            "parent": "" if m.parent is None else m.parent,
            "rollback_to": "" if rollback_to is None else rollback_to,
        }
        if head.distrust is not None:
            fields["untrusted_parent"] = cause(head.distrust)
        notice = nt.encode(nt.Notice(self.model, version, kind, m.lineage, nt.carried(data)))
        self.store.commit(m, data, fields, notice)
        if head.distrust is not None:
            did = "published" if kind == "publish" else f"rolled back to v{rollback_to} as"
            checked = "hashed, checked and " if kind == "publish" else ""
            log.warning(
                "model %r: %s v%d on top of v%d without trusting it (%s): "
                "every tensor was %scounted as changed",
                self.model,
                did,
                version,
                head.number,
                cause(head.distrust),
                checked,
            )
        self._last = PublishReport(
            version=version,
            parent=m.parent,
            created=True,
            tensors_total=len(entries),
            tensors_changed=changed,
            bytes_total=m.nbytes,
            bytes_uploaded=sent,
            bytes_skipped=m.nbytes - sent,
            seconds=time.monotonic() - started,
            kind=kind,
            rollback_to=rollback_to,
            untrusted_parent=None if head.distrust is None else cause(head.distrust),
        )
        return version

    def _lineage(self, head: Head) -> str:
        """The lineage of a new version whose parent's manifest is not trusted (or absent).

        An unsigned or forged manifest that still decodes lends its lineage: a
        lineage only tells agents whether version numbers are comparable (a
        wrong one makes them compare digests instead), and keeping it spares
        them a false "Redis lost its data" when signing is first turned on.
        """
        if head.number is None:
            return mf.new_lineage()
        try:
            return self.store.manifest(head.number).lineage
        except (IntegrityError, NotFound):
            return mf.new_lineage()

    # -- rollback -----------------------------------------------------------------

    def rollback_target(self, head: Manifest) -> int:
        """The version before ``head``: its parent, or for a rollback head the
        newest stored version older than it."""
        if head.kind == "publish" and head.parent is not None:
            return head.parent
        older = [v for v in self.store.versions() if v < head.version]
        if not older:
            raise NotFound(
                f"model {self.model!r}: v{head.version} has no earlier stored version to "
                "roll back to"
            )
        return older[-1]

    def rollback(self, to: int | None = None, message: str = "") -> int:
        """Make version ``to`` (default: the one before head) current as a new version.

        Uploads nothing: the new manifest points at the target's blobs. Raises
        NotFound when the target or any of its blobs was collected by gc.

        A head that cannot be trusted (forged, garbled, missing, unsigned with
        keys set) does not stop a rollback to a version that verifies: the
        default target is then the newest earlier version that does, every
        tensor counts as changed, and the log says why (``untrusted_parent``).
        """
        started = time.monotonic()
        parent = self._head()
        if parent.number is None:
            raise NotFound(f"model {self.model!r} has no versions: nothing to roll back")
        head = parent.manifest
        if to is not None:
            target_version = int(to)
        elif head is not None:
            target_version = self.rollback_target(head)
        else:
            target_version = self._newest_trusted_before(parent, parent.number)
        if target_version < 1 or target_version > parent.number:
            raise NotFound(
                f"model {self.model!r} has no version {target_version} (head is v{parent.number})"
            )
        if target_version == parent.number and head is not None:
            raise ConfigError(
                f"model {self.model!r}: v{target_version} is already the head; nothing to roll back"
            )
        try:
            target = self.store.manifest(target_version, self._keys)
        except NotFound as e:
            raise NotFound(
                f"cannot roll back model {self.model!r} to v{target_version}: its manifest was "
                "collected by gc (or never committed); see `hotswap log`"
            ) from e
        except SignatureError as e:
            # Agents with these keys would refuse the rolled-back tensors too.
            raise SignatureError(
                f"cannot roll back model {self.model!r} to v{target_version}: "
                f"{cause(e)}; agents with HOTSWAP_SIGNING_KEYS set would refuse it: "
                "publish those weights again to sign them"
            ) from e
        # Touched first so a concurrent gc's grace period protects the blobs we check.
        gone = self.store.blobs.missing(target.tensors, touch=True)
        if gone:
            raise NotFound(
                f"cannot roll back model {self.model!r} to v{target_version}: blobs of "
                f"{len(gone)} tensors (e.g. {gone[0].name!r}) were collected by gc; "
                "publish those weights again instead"
            )
        changed = plan.diff(head.tensors if head else (), target.tensors).count
        return self._commit(
            head=parent,
            entries=target.tensors,
            kind="rollback",
            rollback_to=target_version,
            message=message or f"rollback to v{target_version}",
            changed=changed,
            sent=0,
            started=started,
            # An untrusted head's lineage is not taken: the target's is verified.
            lineage=target.lineage if head is None else None,
        )

    def _newest_trusted_before(self, head: Head, number: int) -> int:
        """The newest stored version older than untrusted head ``number`` that verifies."""
        for version in sorted((v for v in self.store.versions() if v < number), reverse=True):
            try:
                self.store.manifest(version, self._keys)
            except (IntegrityError, NotFound):
                continue
            return version
        raise head.refusal("no earlier stored version verifies to roll back to") from head.distrust

    # -- gc and verify ---------------------------------------------------------------

    def running_versions(self) -> list[int]:
        """Versions that live agents (heartbeat not expired) report running."""
        return upkeep.running_versions(self.store)

    def gc(self, keep: int | None = None, dry_run: bool = False) -> GcReport:
        """Delete manifests beyond the newest ``keep`` (default: the setting), except
        head and versions live agents run, then blobs no kept version references and
        no publish touched within the grace period; logs a gc entry."""
        keep = self.settings.keep_versions if keep is None else int(keep)
        return upkeep.collect(
            self.store, keep=keep, grace=self.settings.gc_grace_seconds, dry_run=dry_run
        )

    def verify(self, version: int | None = None, progress: Progress | None = None) -> VerifyReport:
        """Re-read every chunk of a version (default head) and re-hash each tensor."""
        return upkeep.verify(self.store, version, self._keys, progress)

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close the Redis client if this publisher made it."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
