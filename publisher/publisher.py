"""The ``Publisher``: turns state dicts and checkpoints into versions in Redis."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import TracebackType

import torch

from hotswap import codec, keys
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
from publisher import plan, upkeep
from publisher.reports import GcReport, Progress, PublishReport, VerifyReport, author
from publisher.sources import Source, TensorSource, open_source

__all__ = ["GcReport", "Progress", "PublishReport", "Publisher", "VerifyReport"]

log = logging.getLogger("hotswap.publisher")


def _view_key(t: torch.Tensor) -> tuple[object, ...]:
    """Identity of a tensor's bytes: two names with this key are the same memory."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.dtype,
        tuple(t.shape),
        tuple(t.stride()),
    )


@dataclass(frozen=True)
class Head:
    """What a publish builds on: head's number and, when it can be trusted, its manifest.

    An untrusted head (``manifest`` None, ``distrust`` saying why) lends a full
    publish or a rollback only its number, as the parent and for the
    compare-and-set.
    """

    model: str
    number: int | None
    manifest: Manifest | None = None
    distrust: HotswapError | None = None
    signing: bool = False

    def refusal(self, why: str) -> HotswapError:
        """The error for an operation that needs this untrusted head's content."""
        way = "a signed version" if self.signing else "a version"
        return type(self.distrust or HotswapError())(
            f"model {self.model!r}: head v{self.number} cannot be trusted "
            f"({_cause(self.distrust)}); {why}: publish the whole model to put {way} on top"
        )


def _cause(e: HotswapError | None) -> str:
    """The first clause of an error: what is wrong, without the advice after ';'."""
    if isinstance(e, NotFound):
        return "its manifest is missing"
    return str(e).split("; ")[0]


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
            fresh, pending = self._hash(src, names, trusted, progress)
            entries = plan.merge(trusted.tensors, fresh) if trusted and only is not None else fresh
            if len(entries) > self.settings.max_tensors:
                raise SourceError(
                    f"{src.where}: {len(entries)} tensors, over the limit of "
                    f"{self.settings.max_tensors} (HOTSWAP_MAX_TENSORS)"
                )
            stored = trusted.tensors if trusted else ()
            sent, stats = self._upload_missing(src, entries, stored, pending, progress)
            entries = _with_stats(src, entries, pending, stats)
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

    def _hash(
        self,
        src: TensorSource,
        names: Sequence[str],
        head: Manifest | None,
        progress: Progress | None,
    ) -> tuple[list[TensorEntry], set[_Content]]:
        """One entry per name, reading one tensor at a time; head entries reused when equal.

        New content gets its statistics later (``_with_stats``): they are
        computed while that tensor uploads. Returns the entries and the
        contents whose statistics are still to come (NaN until then).
        """
        old = head.by_name() if head else {}
        chunk_of = {e.digest: e.chunk_bytes for e in old.values()}
        seen: dict[tuple[object, ...], TensorEntry] = {}
        out: list[TensorEntry] = []
        pending: set[_Content] = set()
        done = 0
        total = sum(src.size(n) for n in names) if progress else 0
        for name in names:
            tensor = src.load(name)
            view = _view_key(tensor) if src.stable else None
            entry = seen.get(view) if view else None
            if entry is None:
                buf = codec.as_bytes(tensor)
                if len(buf) > self.settings.max_tensor_bytes:
                    raise SourceError(
                        f"{src.where}: tensor {name!r} is {len(buf)} bytes, over the limit of "
                        f"{self.settings.max_tensor_bytes} (HOTSWAP_MAX_TENSOR_BYTES)"
                    )
                digest = codec.digest(buf)
                dtype = codec.dtype_name(tensor.dtype)
                shape = tuple(int(d) for d in tensor.shape)
                prev = old.get(name)
                if prev is not None and (prev.digest, prev.dtype, prev.shape) == (
                    digest,
                    dtype,
                    shape,
                ):
                    entry = prev
                else:
                    chunk = chunk_of.get(digest, self.settings.chunk_bytes)
                    entry = TensorEntry(
                        name, dtype, shape, len(buf), digest, chunk, math.nan, math.nan
                    )
                    pending.add((digest, dtype))
                if view:
                    seen[view] = entry
                del buf
            out.append(entry if entry.name == name else replace(entry, name=name))
            done += entry.nbytes
            del tensor
            if progress:
                progress("hash", done, total)
        return out, pending

    def _upload_missing(
        self,
        src: TensorSource,
        entries: Sequence[TensorEntry],
        stored: Sequence[TensorEntry],
        pending: set[_Content],
        progress: Progress | None,
    ) -> tuple[int, dict[_Content, codec.Stats]]:
        """Upload every blob of ``entries`` Redis lacks: (bytes sent, statistics).

        The statistics of an uploaded tensor whose content is ``pending`` are
        computed in a thread while its bytes upload (the upload waits on the
        Redis server, so the client's core has time: a 512 MiB publish took
        0.80-0.86 s instead of 1.0 s).

        ``stored`` are entries whose blobs should be in Redis (the parent's):
        checked together, and one by one only if one of them is gone.

        Blobs the parent does not reference are touched before the check so
        that a concurrent gc's grace period covers them, and checked again
        after the upload in case a gc deleted one meanwhile. The parent's own
        blobs are checked once, together: gc keeps head's blobs, and the
        parent stays head until the commit (or the commit conflicts).

        Each uploaded tensor is hashed again *after* its upload, in a thread
        while the next one uploads, and must still match the digest it was
        hashed to: no source is immutable (a state dict is the caller's live
        memory, a safetensors file is mapped and shows in-place writes), and
        a tensor that changed between the two reads leaves its blob deleted
        and the publish refused instead of a manifest that lies.
        """
        readable = set(src.names)
        # Any name of ours whose bytes make the blob (inherited names cannot be read).
        name_of = {e.digest: e.name for e in entries if e.name in readable}
        sent = 0
        stats: dict[_Content, Future[codec.Stats]] = {}
        known = {(e.digest, e.chunk_bytes) for e in stored}
        likely = [e for e in entries if (e.digest, e.chunk_bytes) in known]
        unsure = [e for e in entries if (e.digest, e.chunk_bytes) not in known]
        for _attempt in range(3):
            todo = plan.unique_blobs(self.store.missing(unsure, expect_present=likely, touch=True))
            likely = []
            if not todo:
                return sent, {c: f.result() for c, f in stats.items()}
            total = sum(e.nbytes for e in todo.values())
            done = 0
            changed: list[str] = []
            with ThreadPoolExecutor(1, thread_name_prefix="hotswap-verify") as pool:
                checking: _Check | None = None
                for entry in todo.values():
                    if changed:
                        break
                    name = name_of.get(entry.digest)
                    if name is None:
                        raise NotFound(
                            f"model {self.model!r}: blobs of inherited tensor {entry.name!r} are "
                            "gone from Redis (collected or lost); publish the whole model again"
                        )
                    tensor = src.load(name)
                    content = (entry.digest, codec.dtype_name(tensor.dtype))
                    if content in pending and content not in stats:
                        stats[content] = pool.submit(codec.stats, tensor)
                    buf = codec.as_bytes(tensor)
                    del tensor

                    def tick(n: int, base: int = done, total: int = total) -> None:
                        if progress:
                            progress("upload", base + n, total)

                    sent += self.store.upload(entry, buf, _accumulate(tick))
                    done += entry.nbytes
                    if checking is not None and not self._still_same(checking):
                        changed.append(checking.name)
                    checking = _Check(name, entry, pool.submit(codec.digest, buf))
                    del buf
                if checking is not None and not self._still_same(checking):
                    changed.append(checking.name)
            if changed:
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                raise SourceError(
                    f"{src.where}: tensor {changed[0]!r}{more} changed while it was being "
                    "published; publish again once it is stable"
                )
        raise IntegrityError(
            f"model {self.model!r}: uploaded blobs keep disappearing (a gc with "
            "HOTSWAP_GC_GRACE_SECONDS=0 running?); publish again"
        )

    def _still_same(self, check: _Check) -> bool:
        """Wait for one upload's second hash; on a change, delete the blob it made."""
        if check.digest.result() == check.entry.digest:
            return True
        # Its chunks hold bytes that do not hash to the name they are stored under.
        self.store.delete_blobs([plan.blob_of(check.entry)])
        return False

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
            fields["untrusted_parent"] = _cause(head.distrust)
        notice = nt.encode(nt.Notice(self.model, version, kind, m.lineage))
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
                _cause(head.distrust),
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
            untrusted_parent=None if head.distrust is None else _cause(head.distrust),
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
                f"{_cause(e)}; agents with HOTSWAP_SIGNING_KEYS set would refuse it: "
                "publish those weights again to sign them"
            ) from e
        # Touched first so a concurrent gc's grace period protects the blobs we check.
        gone = self.store.missing(target.tensors, touch=True)
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


_Content = tuple[str, str]
"""(digest, dtype): what a tensor's statistics depend on."""


def _with_stats(
    src: TensorSource,
    entries: Sequence[TensorEntry],
    pending: set[_Content],
    known: dict[_Content, codec.Stats],
) -> list[TensorEntry]:
    """``entries`` with the statistics of every ``pending`` content filled in.

    Content that was not uploaded (its blob was in Redis already) is read
    and measured here.
    """
    if not pending:
        return list(entries)
    readable = set(src.names)
    stats = dict(known)
    for e in entries:
        content = (e.digest, e.dtype)
        if content in pending and content not in stats and e.name in readable:
            stats[content] = codec.stats(src.load(e.name))
    out = []
    for e in entries:
        s = stats.get((e.digest, e.dtype)) if (e.digest, e.dtype) in pending else None
        out.append(e if s is None else replace(e, norm=s.norm, max_abs=s.max_abs))
    return out


@dataclass(frozen=True)
class _Check:
    """An uploaded tensor whose bytes are being hashed again."""

    name: str
    entry: TensorEntry
    digest: Future[str]


def _accumulate(tick: Callable[[int], None]) -> Callable[[int], None]:
    """Turn the store's per-batch byte deltas into a running total."""
    total = 0

    def step(n: int) -> None:
        nonlocal total
        total += n
        tick(total)

    return step
