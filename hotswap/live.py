"""The tensors a process serves, by state-dict name, and which of them share storage.

Imports no Redis. ``LiveModel`` is what an agent updates in place: the tensors
it holds, their (dtype, shape) for the metadata checks, which names are tied,
and each tensor's BLAKE3 digest (what runs, compared with a manifest's).

A module's non-persistent buffers (``register_buffer(..., persistent=False)``,
as ``transformers``' ``embeddings.position_ids``) are live tensors too, but
optional ones: ``state_dict()`` leaves them out, so a version published from
it lacks them and is not missing anything, while a checkpoint saved with them
(older Hugging Face files) names them and has them checked and updated like
any tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hotswap import codec
from hotswap.errors import ConfigError, SourceError

# The dtypes a version can carry.
_TRAVELS = frozenset(codec.DTYPES.values())


class LiveModel:
    """The tensors of a serving model by state-dict name, and which share storage."""

    def __init__(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        optional: dict[str, torch.Tensor] = {}
        if isinstance(model, torch.nn.Module):
            tensors = dict(model.state_dict(keep_vars=True))
            # A buffer no version could carry (a dtype that cannot travel) is
            # left out: an agent of a model that has one must still start.
            optional = {
                n: t
                for n, t in non_persistent_buffers(model)
                if n not in tensors and t.dtype in _TRAVELS
            }
            tensors.update(optional)
        else:
            tensors = dict(model)
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"live tensor {name!r} is a {type(t).__name__}, not a tensor")
            try:
                codec.dtype_name(t.dtype)
            except SourceError as e:
                raise ConfigError(f"live tensor {name!r} cannot be updated: {e}") from e
        self.tensors: dict[str, torch.Tensor] = tensors
        # Names a version may give or leave out: never missing, never counted
        # in coverage (``required`` is the rest, in state-dict order).
        self.optional: frozenset[str] = frozenset(optional)
        self.required: dict[str, torch.Tensor] = {
            n: t for n, t in tensors.items() if n not in self.optional
        }
        # (dtype, shape) of every live tensor: a manifest entry that matches
        # needs no further metadata check.
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {
            name: (codec.dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()
        }
        # Names that alias the same view of the same storage (tied weights)
        # map to one canonical name, the first in state-dict order.
        self.canonical: dict[str, str] = {}
        seen: dict[tuple[Any, ...], str] = {}
        for name, t in tensors.items():
            key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
            if t.numel() and key in seen:
                self.canonical[name] = seen[key]
            else:
                seen.setdefault(key, name)
                self.canonical[name] = name

        self._devices = frozenset(t.device for t in tensors.values())
        self._ties = self._groups()
        self.tied: frozenset[str] = frozenset(n for g in self._ties for n in g)

    def _groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for name, canon in self.canonical.items():
            groups.setdefault(canon, []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def ties(self) -> list[list[str]]:
        """Groups of two or more names that share one storage."""
        return [list(g) for g in self._ties]

    def devices(self) -> set[torch.device]:
        return set(self._devices)

    def digests(self) -> dict[str, str]:
        """BLAKE3 of every live tensor's bytes (tied names hashed once)."""
        out: dict[str, str] = {}
        for name, canon in self.canonical.items():
            if canon not in out:
                out[canon] = codec.digest(codec.as_bytes(self.tensors[canon]))
            out[name] = out[canon]
        return out


def non_persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` for every non-persistent buffer of ``module`` and its children.

    ``state_dict()`` leaves these out; ``named_buffers()`` does not say which
    they are, so each module's own record of them is read.

    Example:
        >>> m = torch.nn.Module()
        >>> m.register_buffer("ids", torch.arange(3), persistent=False)
        >>> [n for n, _ in non_persistent_buffers(m)]
        ['ids']
    """
    out = []
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name in sorted(getattr(mod, "_non_persistent_buffers_set", ())):
            buf = mod._buffers.get(name)
            if isinstance(buf, torch.Tensor):
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out
