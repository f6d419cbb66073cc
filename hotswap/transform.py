"""A transform hook: published tensors onto live ones that match neither by name nor shape.

Imports no Redis. Some engines do not hold the checkpoint's tensors: vLLM fuses
``q_proj``, ``k_proj`` and ``v_proj`` into one ``qkv_proj`` (and ``gate_proj``
and ``up_proj`` into ``gate_up_proj``), and a tensor-parallel worker holds a
slice of each. Their ``load_weights`` copies each checkpoint tensor into its
place; a ``Transform`` is the same function, given to an ``Agent``.

The agent keeps its promises around it: the published bytes are checked
against their digests (and their values against the manifest) before the
transform sees them; the transform writes into copies of the live tensors it
touches (``Shadow``), made on first access, so a transform that raises, or
whose result fails validation, changes nothing; the copies are checked like
any new tensor (finite, norm ratio, relative change, validators, by live
name) and copied into the live tensors with the rest of the version, under
the writer lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from hotswap import validate
from hotswap.live import LiveModel

Claims = Callable[[str], "str | Sequence[str] | None"]
"""``claims(published name)``: the live name(s) a published tensor writes, or ``None``
when the transform does not take it (the tensor is then matched by name)."""

Load = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]
"""``load(published, live)``: copy each published tensor given into the live tensors."""

# The subject of a rejection the transform itself caused (not a tensor).
TRANSFORM = "<transform>"


@dataclass(frozen=True)
class Transform:
    """Maps published tensors onto live ones, as an engine's ``load_weights`` does.

    Args:
        claims: ``claims(name)`` -> the live name or names that published
            tensor ``name`` (after the agent's name map) writes, or ``None``
            when the transform does not take it. Called on every name of a
            version before anything is fetched: it decides which names are
            the transform's, and counts the live names they reach for the
            coverage and missing-tensor checks.
        load: ``load(published, live)`` copies the published tensors it is
            given (the claimed ones whose bytes changed, by name) into the
            live tensors, in place (``live[name][rows].copy_(t)``). ``live``
            holds the claimed live tensors only; what ``load`` writes lands in
            copies the agent applies all at once after validation.

    Example:
        >>> def claims(name):
        ...     for part in ("q_proj", "k_proj", "v_proj"):
        ...         if f".{part}." in name:
        ...             return name.replace(part, "qkv_proj")
        ...     return None
        >>> def load(published, live):
        ...     for name, t in published.items():
        ...         part = ("q_proj", "k_proj", "v_proj").index(name.split(".")[-2])
        ...         rows = live[claims(name)].shape[0] // 3
        ...         live[claims(name)][part * rows : (part + 1) * rows].copy_(t)
        >>> fused = Transform(claims, load)
        >>> fused.targets("layers.0.attn.k_proj.weight")
        ('layers.0.attn.qkv_proj.weight',)
        >>> fused.targets("layers.0.mlp.weight")
        ()
    """

    claims: Claims
    load: Load

    def targets(self, name: str) -> tuple[str, ...]:
        """The live names published tensor ``name`` writes (empty: not the transform's)."""
        got = self.claims(name)
        if got is None:
            return ()
        return (got,) if isinstance(got, str) else tuple(got)


class Shadow(Mapping[str, torch.Tensor]):
    """The live tensors as a transform sees them: a copy of each, made on first access.

    Only the live names in ``allowed`` (those the transform claimed) can be
    read; tied names share one copy.
    """

    def __init__(self, live: LiveModel, allowed: set[str]) -> None:
        self._live, self._allowed = live, allowed
        # Canonical live name -> the copy the transform writes.
        self.copies: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._allowed:
            raise KeyError(
                f"{name!r} is not a live tensor the transform claimed "
                f"(claims() must name every live tensor load() writes)"
            )
        canon = self._live.canonical[name]
        copy = self.copies.get(canon)
        if copy is None:
            copy = self.copies[canon] = self._live.tensors[canon].detach().clone()
        return copy

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._allowed))

    def __len__(self) -> int:
        return len(self._allowed)


def run(
    transform: Transform,
    published: Mapping[str, torch.Tensor],
    live: LiveModel,
    *,
    allowed: set[str],
    policy: validate.Policy,
    old_norms: Mapping[str, float],
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Run ``transform.load`` into copies of the live tensors and check what it wrote.

    Returns ``(copies, reasons)``: the new value of each live tensor the
    transform touched (by canonical name), and the reasons to refuse them
    (``TRANSFORM`` if the transform raised). The live tensors are only read.
    """
    shadow = Shadow(live, allowed)
    try:
        with torch.no_grad():
            transform.load(published, shadow)
    except Exception as e:
        # A KeyError's str() is its key's repr: say the message as written.
        said = e.args[0] if isinstance(e, KeyError) and e.args else e
        return {}, {TRANSFORM: [f"the transform raised {type(e).__name__}: {said}"]}
    reasons: dict[str, list[str]] = {}
    for canon, new in shadow.copies.items():
        found = validate.check_values(
            canon,
            None,
            new,
            live.tensors[canon],
            policy.rules_for(canon),
            old_norm=old_norms.get(canon),
        )
        if found:
            reasons[canon] = found
    return shadow.copies, reasons
