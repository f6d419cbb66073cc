"""A stored version's weights written to a ``.safetensors`` file (``hotswap export``).

Each tensor is reconstructed the way ``hotswap verify`` and agents read it
(``Rebuild``: full blobs or chains of deltas, every byte checked against the
manifest's digests before it is written), one tensor in memory at a time, and
written under the manifest's names, dtypes and shapes. Read-only: no blob is
touched, so exporting extends no gc grace period. The file appears whole or
not at all (written beside it, then renamed).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hotswap.candidates import History
from hotswap.errors import ConfigError, IntegrityError, NotFound, SignatureError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.reconstruct import Rebuild
from hotswap.store import Store
from publisher import upkeep
from publisher.reports import Progress

# safetensors pads its JSON header to a multiple of this with spaces.
HEADER_ALIGN = 8


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote: which version, where, how many tensors and bytes."""

    version: int
    path: str
    tensors: int
    bytes: int
    seconds: float
    signed: bool


def header(m: Manifest) -> bytes:
    """The safetensors header (8-byte length, then padded JSON) for ``m``'s tensors, in order.

    Tied tensors (two names over one content) get bytes of their own: the
    format has no sharing.

    Example:
        >>> header(m)[8:40]  # doctest: +SKIP
        b'{"__metadata__":{"hotswap.model"'
    """
    table: dict[str, Any] = {
        "__metadata__": {"hotswap.model": m.model, "hotswap.version": str(m.version)}
    }
    offset = 0
    for e in m.tensors:
        table[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text


def manifest_for_export(
    store: Store, version: int, keys: Sequence[bytes], allow_unsigned: bool
) -> tuple[Manifest, bool]:
    """``version``'s manifest and whether it verified with ``keys``.

    With ``allow_unsigned`` a manifest the keys do not verify (unsigned, or
    signed by a removed key) is read anyway: the point of exporting it may be
    to publish it again, signed. Its tensors are still checked against its
    own digests.
    """
    try:
        return store.manifest(version, keys), bool(keys)
    except SignatureError as e:
        if not allow_unsigned:
            raise SignatureError(
                f"{e}; pass --allow-unsigned to export it anyway (to publish it again, "
                "signed with the current key)"
            ) from e
    return store.manifest(version), False


def export(
    store: Store,
    version: int,
    out: Path,
    *,
    keys: Sequence[bytes] = (),
    allow_unsigned: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Write ``version``'s tensors to ``out`` as safetensors (see the module docstring).

    Raises:
        NotFound: no such version.
        IntegrityError: the manifest does not verify with ``keys`` (unless
            ``allow_unsigned``), or a tensor cannot be read back exactly.
        ConfigError: ``out`` exists (and not ``overwrite``) or its folder does not.
    """
    started = time.monotonic()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist")
    m, signed = manifest_for_export(store, version, keys, allow_unsigned)
    history = History(store, m, upkeep.newer_manifests(store, m, keys if signed else ()))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header(m))
            _write_tensors(store, m, history, f, progress)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportReport(
        version=m.version,
        path=str(out),
        tensors=len(m.tensors),
        bytes=m.nbytes,
        seconds=time.monotonic() - started,
        signed=signed,
    )


def _write_tensors(
    store: Store, m: Manifest, history: History, f: BinaryIO, progress: Progress | None
) -> None:
    """Each tensor's checked bytes, in header order."""
    where = f"model {store.model!r} v{m.version}"
    done = 0
    for e in m.tensors:
        f.write(tensor_bytes(store, m, e, history, where))
        done += e.nbytes
        if progress:
            progress("export", done, m.nbytes)


def tensor_bytes(
    store: Store, m: Manifest, e: TensorEntry, history: History, where: str
) -> bytearray:
    """Tensor ``e`` of version ``m``, its bytes checked against its digest (read-only)."""
    buf = bytearray(e.nbytes)
    if e.nbytes:
        try:
            Rebuild(store.blobs, m, e, history=history, where=where).into(memoryview(buf))
        except NotFound as err:
            raise IntegrityError(f"{where} tensor {e.name!r}: {err}") from err
    return buf
