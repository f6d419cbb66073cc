"""The ``Publisher``: turns state dicts and checkpoints into versions in Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from types import TracebackType

import torch

from hotswap import keys
from hotswap import manifest as mf
from hotswap.connection import RedisClient, connect
from hotswap.errors import ConfigError, HotswapError
from hotswap.headrecord import HeadRecord
from hotswap.manifest import Manifest
from hotswap.names import Rename
from hotswap.replication import Replication
from hotswap.settings import HotswapSettings
from hotswap.settings import load as load_settings
from hotswap.store import Store
from hotswap.validate import Policy
from publisher import commit, complete, contents, heads, plan, resign, restore, rollbackplan, upkeep
from publisher.base import Base
from publisher.fingerprint import Fingerprints
from publisher.mapping import SourceMapping
from publisher.plan import Head
from publisher.precheck import before_upload
from publisher.promote import Promotion, make_head
from publisher.reports import GcReport, Progress, PublishReport, VerifyReport
from publisher.sources import Source, open_source

__all__ = ["GcReport", "Progress", "PublishReport", "Publisher", "VerifyReport"]

log = logging.getLogger("hotswap.publisher")


class Publisher:
    """Publishes versions of one model, rolls back, collects garbage and verifies.

    Tensors with equal bytes, dtype and shape share blobs, across versions
    too: tied weights (an embedding tied to the output layer) are two
    manifest entries over one blob, hashed and uploaded once.

    Args:
        model_name: the model's name in Redis (``[A-Za-z0-9._-]{1,128}``).
        settings: defaults to ``HotswapSettings()`` (``HOTSWAP_*`` env, ``.env``).
        connection: a redis client to use; made from the settings when None
            (and then closed by ``close()``).

    Raises:
        ConfigError: an invalid model name, setting or ``HOTSWAP_REDIS_URL``.

    Example::

        from publisher import Publisher

        with Publisher("minilm") as pub:
            version = pub.publish(model.state_dict(), message="nightly")
            print(version, pub.last_report.bytes_uploaded)
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
        # HOTSWAP_WAIT_REPLICAS: WAIT before each commit (blobs) and after it (the commit).
        self.replication = Replication.of(self.client, self.model, self.settings)
        keys_ = self.settings.key_bytes()
        self._keys = keys_
        self._signing_key = keys_[0] if keys_ else None
        self._last: PublishReport | None = None
        # Digests of contents this publisher read, by fingerprint (publisher.fingerprint).
        self._fingerprints = Fingerprints()
        # The bytes it last published, to encode the next deltas (publisher.base).
        self._base = Base()
        # What the last ``promote`` did (None before one).
        self.last_promotion: Promotion | None = None

    @property
    def last_report(self) -> PublishReport:
        """The report of the last ``publish`` or ``rollback`` of this publisher.

        Raises:
            HotswapError: this publisher has not published or rolled back yet.
        """
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
        *,
        exclude: Sequence[str] = (),
        follow_symlinks: bool = False,
        rename: Rename | None = None,
        strip_prefix: str | Sequence[str] = (),
        dtype: str | torch.dtype | None = None,
        check: Policy | None = None,
        promote: bool = True,
    ) -> int:
        """Publish ``source`` as a new version and return its number.

        Only tensors whose bytes are not already in Redis are uploaded. A head
        whose manifest cannot be trusted (unsigned while signing keys are set,
        forged, garbled, missing) lends a full publish only its number: every
        tensor counts as changed and the log says why (``untrusted_parent``).

        Args:
            source: a state dict (name -> tensor) or the path of a ``.safetensors``
                file, a folder of them, an ``*.index.json`` or a ``.pt``/``.bin``.
            message: a note for the manifest and ``hotswap log``.
            only: globs of published names; just the matching tensors are read,
                the rest are inherited from head (which must exist and be trusted).
            force: create a version even when nothing changed since head, and
                skip the comparison with head (``publisher.precheck``).
            progress: called as ``progress(phase, bytes_done, bytes_total)``.
            exclude: globs; matching tensors are left out of the new version on
                purpose, whether the source holds them (by its name or the
                published one) or head does. A full publish that lacks a tensor
                of head is refused unless an ``exclude`` glob names it.
            follow_symlinks: read files of a checkpoint folder that are
                symlinks to files outside it.
            rename: ``{name: new name}`` or a callable (``None``: leave it
                out), applied after ``strip_prefix`` (``hotswap.names.NameMap``).
            strip_prefix: a prefix (or several, the first that matches) to remove
                from the source's names: ``"module."``, ``"_orig_mod."``, ``"bert."``.
            dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: cast floating-point
                tensors; the digest is over the cast bytes, as published.
            check: a ``Policy`` whose ``check_finite`` and ``norm_ratio`` (against
                head's norms) run on every tensor before anything is uploaded.
            promote: False: store the version on top of head without making it
                head; agents following head never see it (``promote`` later).

        Returns:
            The new version's number, or head's when nothing changed (and not
            ``force``); ``last_report`` says which.

        Raises:
            SourceError: the source cannot be read, is over a size limit,
                changed while it was being published, does not fit head's names,
                shapes and dtypes (``publisher.precheck``; not checked with
                ``force``, nor for a first version), or (a full publish) lacks
                tensors of head that ``exclude`` does not name.
            ValidationError: ``check`` refused values (nothing was uploaded).
            ConfigError: ``message`` too long, or ``only`` without a version
                to inherit from.
            VersionConflict: another publisher committed first (nothing written).
            NotFound: blobs of an inherited tensor are gone (collected or lost).
            StoreUnavailable: Redis could not be reached.

        Example::

            v = pub.publish("model.safetensors", message="nightly")
            v = pub.publish(model.state_dict(), only=["head.*"], message="new head")
            v = pub.publish("ckpt/", exclude=["lm_head.weight"])  # tied, not saved
            v = pub.publish("model.safetensors", strip_prefix="bert.", dtype="bf16")
            v = pub.publish(model.state_dict(), promote=False)  # then pub.promote(v)
        """
        started = time.monotonic()
        if len(message) > mf.MAX_MESSAGE_LEN:
            raise ConfigError(f"message is {len(message)} characters, limit {mf.MAX_MESSAGE_LEN}")
        transform = SourceMapping.of(exclude, rename, strip_prefix, dtype)
        with open_source(source, follow_symlinks=follow_symlinks) as raw:
            src = transform.apply(raw)
            names = complete.kept(plan.select(src.names, only, src.where), exclude)
            head, record = self._head()
            # Before anything is hashed or written: a refusal changes nothing.
            before_upload(src, names, head, only=only, exclude=exclude, force=force, check=check)
            trusted = head.manifest
            built = contents.build(
                self.store,
                src,
                names,
                trusted,
                self.settings,
                only=only,
                exclude=exclude,
                progress=progress,
                memo=self._fingerprints,
                base=self._base,
            )
            entries, sent = built.entries, built.sent
        self._fingerprints.retain({e.digest for e in entries})
        # An untrusted head is compared with nothing: every tensor counts as new.
        changes = plan.diff(trusted.tensors if trusted else (), entries)
        if trusted is not None and changes.count == 0 and not force:
            seconds = time.monotonic() - started
            self._base.retain({e.digest for e in entries})
            self._last = commit.unchanged(trusted, len(entries), sent, seconds)
            return trusted.version
        change = commit.Change(
            entries, "publish", message, changes.count, sent, tally=built.tally, promote=promote
        )
        return self._commit(head, record, change, started)

    def _head(self) -> tuple[Head, bytes | None]:
        guess = self._last.version if self._last is not None else None
        return heads.read(self.store, self._keys, guess)

    def _commit(self, head: Head, record: bytes | None, c: commit.Change, started: float) -> int:
        self.replication.before_commit(self.store.ns, c.entries)
        version = self.store.reserve_version()
        lineage = c.lineage
        if lineage is None:
            lineage = head.manifest.lineage if head.manifest else heads.lineage(self.store, head)
        m = commit.new_manifest(
            head,
            version,
            c.entries,
            kind=c.kind,
            rollback_to=c.rollback_to,
            message=c.message,
            lineage=lineage,
            earliest=commit.not_before(head, record, self._keys),
        )
        data = mf.encode(m, self._signing_key)
        expiry = self.settings.head_expiry_seconds
        notice, signed = commit.announcement(m, data, self._signing_key, expiry)
        fields = commit.log_fields(
            m, head, c.changed, c.sent, skipped=c.skipped, promoted=c.promote
        )
        fields.update(c.tally.log_fields() if c.tally is not None else {})
        self.store.commit(m, data, fields, notice, signed, promote=c.promote)
        self.replication.after_commit(self.store.ns, version)
        if head.distrust is not None:
            log.warning(*commit.untrusted_warning(m, head))
        seconds = time.monotonic() - started
        report = commit.committed(m, head, c.changed, c.sent, seconds, skipped=c.skipped)
        if c.tally is not None:
            self._base.retain({e.digest for e in c.entries})
            report = replace(report, **c.tally.report(self._base.nbytes))
        self._last = report
        return version

    def promote(self, version: int, message: str = "") -> int:
        """Make ``version``, published with ``promote=False``, head: agents that follow
        head apply it. Only while head is still the version's parent: a publish or
        rollback since then supersedes it. Promoting the head changes nothing.
        ``last_promotion`` says what happened (``publisher.promote``).

        Args: ``version``, a stored version whose parent is head (returned, now
        head); ``message``, a note for ``hotswap log``.

        Raises:
            VersionConflict: head moved since ``version`` was published (the
                message names head; nothing written).
            NotFound: no such version (or collected by gc).
            IntegrityError: it does not verify with the signing keys.
            StoreUnavailable: Redis could not be reached.

        Example::

            v = pub.publish(model.state_dict(), promote=False)
            pub.promote(v, message="canary passed")
        """
        expiry = self.settings.head_expiry_seconds
        done = make_head(self.store, version, message=message, keys=self._keys, expiry=expiry)
        if done.moved:
            self.replication.after_commit(self.store.ns, version)
        self.last_promotion = done
        return version

    # -- rollback -----------------------------------------------------------------

    def rollback_target(self, head: Manifest) -> int:
        """The version ``rollback()`` restores by default from ``head``: the newest
        stored earlier version that verifies, was not retracted by a rollback (one
        to T from P retracts every version in (T, P]), holds other tensors, was
        rejected by no agent and, where live agents run older versions than head,
        is one of those (``publisher.restore``).

        Raises:
            NotFound: no such version (the error lists those passed over).
        """
        parent = Head(self.model, head.version, head, signing=bool(self._keys))
        return restore.default_target(self.store, self._keys, parent, head.version).version

    def rollback(self, to: int | None = None, message: str = "") -> int:
        """Make version ``to`` (default: the one before head) current as a new version.

        Uploads nothing: the new manifest points at the target's blobs. An
        untrusted head does not stop a rollback to a version that verifies
        (the default target is then the newest earlier one that does).

        Args:
            to: the version to restore; default the newest earlier version
                that verifies, was not retracted by a rollback, differs from
                head and that agents applied and none rejected
                (``rollback_target``); ``last_report.skipped`` says which
                newer ones it passed over, and why.
            message: a note for the log (default ``"rollback to vN"``, plus
                what the default target skipped).

        Returns:
            The number of the new version.

        Raises:
            NotFound: no such version, or it or some of its blobs were
                collected by gc.
            ConfigError: ``to`` is already the head.
            SignatureError: the target is not signed with the signing keys.
            VersionConflict: another publisher committed first (nothing written).
            StoreUnavailable: Redis could not be reached.

        Example::

            v = pub.rollback()  # the version before head
            v = pub.rollback(to=3, message="v4 diverged")
        """
        started = time.monotonic()
        parent, record = self._head()
        change = rollbackplan.prepare(self.store, self._keys, parent, to, message)
        return self._commit(parent, record, change, started)

    # -- the signed head ---------------------------------------------------------------

    def resign(self) -> HeadRecord:
        """Issue the signed head record again for the current head: same version, new
        issue time and (with ``head_expiry_seconds``) a new expiry.

        Agents that require an expiry (``head_require_expiry``) refuse a head
        whose record has expired: run this on a schedule, well within the
        expiry (every ``head_expiry_seconds / 3``, say), from a host that holds
        the signing key. It writes nothing if a publish, rollback or another
        re-sign committed since it read head.

        Returns:
            The record written.

        Raises:
            ConfigError: this publisher has no signing key.
            NotFound: nothing published yet, or head's manifest is missing.
            IntegrityError: head's manifest does not verify with the signing
                keys (``SignatureError``: unsigned, or signed by an unknown key).
            VersionConflict: head or its record changed meanwhile (nothing written).
            StoreUnavailable: Redis could not be reached.

        Example::

            record = pub.resign()
            print(record.version, record.expires)
        """
        key = self._signing_key
        if key is None:
            raise ConfigError(
                f"model {self.model!r}: re-signing head needs a signing key; "
                "set HOTSWAP_SIGNING_KEYS"
            )
        return resign.resign(self.store, key, self._keys, self.settings.head_expiry_seconds)

    # -- gc and verify ---------------------------------------------------------------

    def running_versions(self) -> list[int]:
        """Versions that live agents (heartbeat not expired) report running."""
        return upkeep.running_versions(self.store)

    def gc(self, keep: int | None = None, dry_run: bool = False) -> GcReport:
        """Delete old versions' manifests, then the blobs no kept version uses.

        Head and every version a live agent runs are kept whatever ``keep``
        says; a blob a publish touched within ``HOTSWAP_GC_GRACE_SECONDS``
        is kept too, so a publish in flight does not lose its uploads. A run
        that deletes (not ``dry_run``) writes a gc entry to the log.

        Args:
            keep: the newest versions to keep (default ``HOTSWAP_KEEP_VERSIONS``).
            dry_run: report what would be deleted, delete nothing.

        Returns:
            What was kept and deleted (``GcReport``).

        Raises:
            StoreUnavailable: Redis could not be reached.

        Example::

            report = pub.gc(keep=5, dry_run=True)
            print(report.deleted_versions, report.blobs_deleted)
        """
        keep = self.settings.keep_versions if keep is None else int(keep)
        return upkeep.collect(
            self.store, keep=keep, grace=self.settings.gc_grace_seconds, dry_run=dry_run
        )

    def verify(self, version: int | None = None, progress: Progress | None = None) -> VerifyReport:
        """Re-read every chunk of a version and re-hash each tensor against its digest.

        Args:
            version: the version to check (default: head).
            progress: called as ``progress("verify", bytes_done, bytes_total)``.

        Returns:
            A ``VerifyReport``: ``ok`` is False and ``bad`` names each tensor
            that failed, and why. A failed tensor is reported, not raised.

        Raises:
            NotFound: no such version (or nothing published yet).
            IntegrityError: the version's manifest itself does not verify.
            StoreUnavailable: Redis could not be reached.

        Example::

            report = pub.verify()
            assert report.ok, report.bad
        """
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
