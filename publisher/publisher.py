"""The ``Publisher``: turns state dicts and checkpoints into versions in Redis."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType

import torch

from hotswap import codec, keys
from hotswap import manifest as mf
from hotswap import notice as nt
from hotswap.connection import RedisClient, connect, retry_from_settings
from hotswap.errors import (
    ConfigError,
    HotswapError,
    IntegrityError,
    NotFound,
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


# Elements per block when computing stats of a large tensor: 8 MB of float64.
STATS_BLOCK = 1 << 20


def tensor_stats(tensor: torch.Tensor) -> codec.Stats:
    """``codec.stats`` in float64 blocks, so a large tensor is never copied whole.

    ``codec.stats`` casts the whole tensor to float64 (twice a float32 tensor's
    size); this sums the same squares block by block, agreeing to ~1e-13
    (relative), far inside the agent's norm tolerance.
    """
    t = tensor.detach()
    if t.numel() <= STATS_BLOCK or t.is_complex() or codec.dtype_name(t.dtype) == "F4_E2M1_X2":
        return codec.stats(t)
    flat = t.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    lo, hi = math.inf, -math.inf
    for start in range(0, flat.numel(), STATS_BLOCK):
        block = flat[start : start + STATS_BLOCK].to(torch.float64)
        total += torch.dot(block, block)
        b_lo, b_hi = torch.aminmax(block)
        lo, hi = min(lo, float(b_lo)), max(hi, float(b_hi))
    norm = math.sqrt(float(total))
    # As codec.stats: a NaN anywhere makes both figures NaN.
    return codec.Stats(norm, norm if math.isnan(norm) else max(abs(lo), abs(hi)))


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
        self.store = Store(
            self.client,
            self.model,
            namespace=self.settings.namespace,
            retrying=retry_from_settings(self.settings),
            limits=mf.Limits(
                max_manifest_bytes=self.settings.max_manifest_bytes,
                max_tensors=self.settings.max_tensors,
                max_tensor_bytes=self.settings.max_tensor_bytes,
            ),
        )
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
        """
        started = time.monotonic()
        if len(message) > mf.MAX_MESSAGE_LEN:
            raise ConfigError(f"message is {len(message)} characters, limit {mf.MAX_MESSAGE_LEN}")
        with open_source(source) as src:
            names = plan.select(src.names, only, src.where)
            head = self.store.head_manifest(self._keys)
            if only is not None and head is None:
                raise ConfigError(
                    f"model {self.model!r} has no version yet: --only needs a parent to inherit "
                    "the other tensors from; publish the whole model first"
                )
            fresh = self._hash(src, names, head, progress)
            entries = plan.merge(head.tensors, fresh) if head and only is not None else fresh
            if len(entries) > self.settings.max_tensors:
                raise SourceError(
                    f"{src.where}: {len(entries)} tensors, over the limit of "
                    f"{self.settings.max_tensors} (HOTSWAP_MAX_TENSORS)"
                )
            sent = self._upload_missing(src, entries, progress)
        changes = plan.diff(head.tensors if head else (), entries)
        if head is not None and changes.count == 0 and not force:
            self._last = PublishReport(
                version=head.version,
                parent=head.parent,
                created=False,
                tensors_total=len(entries),
                tensors_changed=0,
                bytes_total=head.nbytes,
                bytes_uploaded=sent,
                bytes_skipped=head.nbytes - sent,
                seconds=time.monotonic() - started,
            )
            return head.version
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

    def _hash(
        self,
        src: TensorSource,
        names: Sequence[str],
        head: Manifest | None,
        progress: Progress | None,
    ) -> list[TensorEntry]:
        """One entry per name, reading one tensor at a time; head entries reused when equal."""
        old = head.by_name() if head else {}
        chunk_of = {e.digest: e.chunk_bytes for e in old.values()}
        seen: dict[tuple[object, ...], TensorEntry] = {}
        out: list[TensorEntry] = []
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
                    stats = tensor_stats(tensor)
                    chunk = chunk_of.get(digest, self.settings.chunk_bytes)
                    entry = TensorEntry(
                        name, dtype, shape, len(buf), digest, chunk, stats.norm, stats.max_abs
                    )
                if view:
                    seen[view] = entry
                del buf
            out.append(entry if entry.name == name else replace(entry, name=name))
            done += entry.nbytes
            del tensor
            if progress:
                progress("hash", done, total)
        return out

    def _upload_missing(
        self, src: TensorSource, entries: Sequence[TensorEntry], progress: Progress | None
    ) -> int:
        """Upload every blob of ``entries`` Redis lacks; returns bytes sent.

        Blobs are touched before the check so that a concurrent gc's grace
        period covers them, and checked again after the upload in case a gc
        deleted one meanwhile.
        """
        readable = set(src.names)
        # Any name of ours whose bytes make the blob (inherited names cannot be read).
        name_of = {e.digest: e.name for e in entries if e.name in readable}
        sent = 0
        for _attempt in range(3):
            self.store.touch_blobs(entries)
            todo = plan.unique_blobs(self.store.missing(entries))
            if not todo:
                return sent
            total = sum(e.nbytes for e in todo.values())
            done = 0
            for entry in todo.values():
                name = name_of.get(entry.digest)
                if name is None:
                    raise NotFound(
                        f"model {self.model!r}: blobs of inherited tensor {entry.name!r} are "
                        "gone from Redis (collected or lost); publish the whole model again"
                    )
                buf = codec.as_bytes(src.load(name))
                if codec.digest(buf) != entry.digest:
                    raise SourceError(
                        f"{src.where}: tensor {name!r} changed while it was being published; "
                        "publish again once it is stable"
                    )

                def tick(n: int, base: int = done, total: int = total) -> None:
                    if progress:
                        progress("upload", base + n, total)

                sent += self.store.upload(entry, buf, _accumulate(tick))
                done += entry.nbytes
                del buf
        raise IntegrityError(
            f"model {self.model!r}: uploaded blobs keep disappearing (a gc with "
            "HOTSWAP_GC_GRACE_SECONDS=0 running?); publish again"
        )

    def _commit(
        self,
        *,
        head: Manifest | None,
        entries: Sequence[TensorEntry],
        kind: str,
        rollback_to: int | None,
        message: str,
        changed: int,
        sent: int,
        started: float,
    ) -> int:
        version = self.store.reserve_version()
        m = Manifest(
            model=self.model,
            version=version,
            parent=head.version if head else None,
            lineage=head.lineage if head else mf.new_lineage(),
            tensors=tuple(entries),
            kind=kind,
            rollback_to=rollback_to,
            created=time.time(),
            author=author(),
            message=message,
        )
        data = mf.encode(m, self._signing_key)
        log: dict[str, str | int | float] = {
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
        notice = nt.encode(nt.Notice(self.model, version, kind, m.lineage))
        self.store.commit(m, data, log, notice)
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
        )
        return version

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
        """
        started = time.monotonic()
        head = self.store.head_manifest(self._keys)
        if head is None:
            raise NotFound(f"model {self.model!r} has no versions: nothing to roll back")
        target_version = self.rollback_target(head) if to is None else int(to)
        if target_version < 1 or target_version > head.version:
            raise NotFound(
                f"model {self.model!r} has no version {target_version} (head is v{head.version})"
            )
        if target_version == head.version:
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
        # Touch first so a concurrent gc's grace period protects the blobs we check.
        self.store.touch_blobs(target.tensors)
        gone = self.store.missing(target.tensors)
        if gone:
            raise NotFound(
                f"cannot roll back model {self.model!r} to v{target_version}: blobs of "
                f"{len(gone)} tensors (e.g. {gone[0].name!r}) were collected by gc; "
                "publish those weights again instead"
            )
        changed = plan.diff(head.tensors, target.tensors).count
        return self._commit(
            head=head,
            entries=target.tensors,
            kind="rollback",
            rollback_to=target_version,
            message=message or f"rollback to v{target_version}",
            changed=changed,
            sent=0,
            started=started,
        )

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


def _accumulate(tick: Callable[[int], None]) -> Callable[[int], None]:
    """Turn the store's per-batch byte deltas into a running total."""
    total = 0

    def step(n: int) -> None:
        nonlocal total
        total += n
        tick(total)

    return step
