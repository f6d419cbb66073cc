"""How an agent reads a published version onto its model: name map, coverage, transform.

Imports no Redis (the store and blob reader are passed in). ``Intake.prepare``
wraps ``staging.prepare``:

1. the manifest's names go through the agent's ``NameMap`` (``hotswap.names``):
   the entries it leaves out are dropped, the others renamed to live names,
   older manifests too (tensors stored as deltas walk them by name);
2. the names a ``Transform`` claims are set apart;
3. coverage: the live names reached (matched by name, a tied twin, or
   claimed by the transform) must be at least ``Policy.min_coverage`` of the
   live model's, and never none: otherwise the version is refused before a
   byte is fetched, with what matched, what did not and a hint;
4. ``staging.prepare`` checks, fetches, casts and validates the others;
5. the claimed tensors are fetched and checked, and the transform writes
   copies of the live tensors it claims (``hotswap.transform``), which join
   the staged version: applied with it, all at once, or not at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch

from hotswap import codec, transform, validate
from hotswap.candidates import Manifests, unknown_encoding
from hotswap.errors import ConfigError, NotFound
from hotswap.frames import Blobs
from hotswap.hostmem import HostMemory
from hotswap.live import LiveModel
from hotswap.manifest import Manifest, TensorEntry
from hotswap.names import Coverage, NameMap, coverage
from hotswap.ranbefore import RanBefore
from hotswap.slices import SLICES, SliceEntry, Slicer
from hotswap.staging import Plan, Staged, Staging, fetch, prepare
from hotswap.transform import TRANSFORM, Transform

# The subject of a rejection for a name map that cannot apply (not a tensor).
NAMES = "<names>"
# How a coverage hint spells the fix to an agent's user.
STRIP_OPTION = "Agent(names=NameMap(strip_prefix={!r}))"


class MappedManifests:
    """Older manifests, read through the agent's name map (``candidates.Manifests``)."""

    def __init__(self, manifests: Manifests, intake: Intake) -> None:
        self._manifests, self._intake = manifests, intake

    def manifest(self, version: int) -> Manifest:
        m = self._manifests.manifest(version)
        try:
            return self._intake.translate(m)
        except ConfigError as e:
            # Fewer routes to a delta's base, never a wrong one.
            raise NotFound(f"v{version} cannot be read through the name map: {e}") from e


class Intake:
    """An agent's name map and transform, applied to each version it stages.

    Args:
        names: maps published names to live ones (default: unchanged).
        transform: takes the published tensors that are not the live model's
            (fused or sliced parameters); see ``hotswap.transform.Transform``.

    Example:
        >>> intake = Intake(NameMap(strip_prefix="bert."))
        >>> intake.plain
        False
    """

    def __init__(
        self,
        names: NameMap | None = None,
        xform: Transform | None = None,
        slicer: Slicer | None = None,
    ) -> None:
        if names is not None and not isinstance(names, NameMap):
            raise ConfigError(f"names must be a NameMap, not {type(names).__name__}")
        if xform is not None and not isinstance(xform, Transform):
            raise ConfigError(f"transform must be a Transform, not {type(xform).__name__}")
        self.names = names if names is not None else NameMap()
        self.transform = xform
        self.slicer = slicer if slicer is not None else Slicer()

    @property
    def plain(self) -> bool:
        """True when names go through unchanged, no transform runs and every tensor is
        taken whole."""
        return self.names.identity and self.transform is None and self.slicer.identity

    def translate(self, m: Manifest) -> Manifest:
        """``m`` with live names: entries the map leaves out dropped (ConfigError on a clash)."""
        if self.names.identity:
            return m
        mapped = self.names.apply(e.name for e in m.tensors)
        tensors = tuple(
            dataclasses.replace(e, name=mapped[e.name]) for e in m.tensors if e.name in mapped
        )
        return dataclasses.replace(m, tensors=tensors)

    def claimed(self, m: Manifest) -> dict[str, tuple[str, ...]]:
        """``{name: live names}`` for the entries of (translated) ``m`` the transform takes."""
        if self.transform is None:
            return {}
        out = {}
        for e in m.tensors:
            targets = self.transform.targets(e.name)
            if targets:
                out[e.name] = targets
        return out

    def coverage(
        self, m: Manifest, live: LiveModel, claimed: Mapping[str, tuple[str, ...]]
    ) -> Coverage:
        """The live names ``m`` (as published) reaches, tied twins and claimed names counted."""
        published = [e.name for e in m.tensors]
        if claimed:
            back = self.names.apply(published)
            published = [n for n in published if back.get(n) not in claimed]
        cov = coverage(published, live.tensors, self.names)
        reached = set(cov.matched) | {n for ts in claimed.values() for n in ts}
        for group in live.ties():
            if reached & set(group):
                reached |= set(group)
        # Optional live tensors (non-persistent buffers) match a name but count
        # for nothing: a version from ``state_dict()`` lacks them.
        reached &= set(live.required)
        return dataclasses.replace(
            cov,
            matched=tuple(sorted(reached)),
            missing=tuple(n for n in cov.missing if n not in reached and n in live.required),
        )

    def history(self, manifests: Manifests | None) -> Manifests | None:
        if manifests is None or self.names.identity:
            return manifests
        return MappedManifests(manifests, self)

    def prepare(
        self,
        reader: Blobs,
        m: Manifest,
        live: LiveModel,
        digests: Mapping[str, str],
        policy: validate.Policy,
        *,
        mode: Staging,
        where: str,
        between: Callable[[], None] | None = None,
        memory: HostMemory | None = None,
        old_norms: Mapping[str, float] | None = None,
        history: Manifests | None = None,
        ran: RanBefore | None = None,
    ) -> tuple[Manifest, Staged, dict[str, list[str]]]:
        """``staging.prepare`` through the name map, coverage check and transform.

        Returns ``(described, staged, reasons)``: ``m``'s entries that
        describe live bytes as they would run (live names; cast and
        transformed ones left out, since their stated norms are not those of
        the bytes that run: for ``RunState.learn``), the staged version
        (transform results included) and the reasons to refuse it (empty:
        safe to apply).
        """
        try:
            mapped = self.translate(m)
        except Exception as e:  # the user's rename callable, too
            return m, _nothing(m), {NAMES: [_failed("the name map", e)]}
        try:
            # Slices only here: older manifests (deltas' routes) stay whole.
            mapped = self.slicer.apply(mapped)
        except Exception as e:  # the user's shards callable, too
            return m, _nothing(m), {SLICES: [_failed("the shards", e)]}
        try:
            claimed = self.claimed(mapped)
        except Exception as e:
            return mapped, _nothing(mapped), {TRANSFORM: [_failed("claims()", e)]}
        regular = dataclasses.replace(
            mapped, tensors=tuple(e for e in mapped.tensors if e.name not in claimed)
        )
        refused = self._refuse_early(m, mapped, live, claimed, policy)
        if refused:
            return _described(regular, live), _nothing(mapped), refused
        writes = {n for ts in claimed.values() for n in ts}
        staged, reasons = prepare(
            reader,
            regular,
            live,
            digests,
            policy,
            mode=mode,
            where=where,
            between=between,
            memory=memory,
            old_norms=old_norms,
            history=self.history(history),
            covered=writes,
            ran=ran,
        )
        staged.plan.manifest = mapped
        described = _described(regular, live)
        if claimed:
            try:
                self._transformed(
                    reader,
                    mapped,
                    claimed=claimed,
                    staged=staged,
                    reasons=reasons,
                    live=live,
                    digests=digests,
                    policy=policy,
                    mode=mode,
                    where=where,
                    between=between,
                    old_norms=old_norms or {},
                    history=self.history(history),
                )
            except BaseException:
                staged.release()
                raise
        return described, staged, reasons

    def _refuse_early(
        self,
        m: Manifest,
        mapped: Manifest,
        live: LiveModel,
        claimed: Mapping[str, tuple[str, ...]],
        policy: validate.Policy,
    ) -> dict[str, list[str]]:
        """Reasons found before any fetch: claims of names the model lacks, too little coverage."""
        unknown = sorted({n for ts in claimed.values() for n in ts if n not in live.tensors})
        if unknown:
            return {TRANSFORM: [f"claims live tensors the model lacks: {_some(unknown)}"]}
        if _enough(mapped, live, claimed, policy.min_coverage):
            return {}
        # Refused: now the full account, from the names as published.
        cov = self.coverage(m, live, claimed)
        if cov.live and (not cov.matched or cov.share < policy.min_coverage):
            return {validate.COVERAGE: [cov.describe(STRIP_OPTION, need=policy.min_coverage)]}
        return {}

    def _transformed(
        self,
        reader: Blobs,
        mapped: Manifest,
        *,
        claimed: Mapping[str, tuple[str, ...]],
        staged: Staged,
        reasons: dict[str, list[str]],
        live: LiveModel,
        digests: Mapping[str, str],
        policy: validate.Policy,
        mode: Staging,
        where: str,
        between: Callable[[], None] | None,
        old_norms: Mapping[str, float],
        history: Manifests | None,
    ) -> None:
        """Fetch the claimed tensors that changed, run the transform, join its copies to
        ``staged`` (reasons added to ``reasons``)."""
        assert self.transform is not None
        entries = [e for e in mapped.tensors if e.name in claimed]
        changed = {e.name: e for e in entries if digests.get(e.name) != e.digest}
        if not changed:
            return
        for name, e in changed.items():
            no = unknown_encoding(e, where)
            if no:
                reasons.setdefault(name, []).append(no)
        if any(n in reasons for n in changed):
            return
        places = _placeholders(changed.values(), claimed, live)
        p = Plan(mapped, list(changed.values()), dict(changed))
        got = fetch(
            reader,
            p,
            places,
            mode=mode,
            where=where,
            between=between,
            memory=HostMemory(),
            history=history,
        )
        try:
            staged.bytes_fetched += got.bytes_fetched
            staged.seconds += got.seconds
            for name, why in got.failures.items():
                reasons.setdefault(name, []).extend(why)
            for name, e in changed.items():
                if name in got.tensors:
                    found = _check_published(name, e, got.tensors[name], policy)
                    if found:
                        reasons.setdefault(name, []).extend(found)
            if any(n in reasons for n in changed):
                return
            allowed = {n for ts in claimed.values() for n in ts}
            copies, wrong = transform.run(
                self.transform,
                got.tensors,
                live,
                allowed=allowed,
                policy=policy,
                old_norms=old_norms,
            )
        finally:
            got.release()
        for name, why in wrong.items():
            reasons.setdefault(name, []).extend(why)
        both = sorted(set(copies) & set(staged.tensors))
        if both:
            reasons.setdefault(TRANSFORM, []).append(
                f"writes live tensors the version also gives by name: {_some(both)}"
            )
        staged.tensors.update(copies)
        staged.plan.changed.update(changed)


def _enough(
    mapped: Manifest, live: LiveModel, claimed: Mapping[str, tuple[str, ...]], need: float
) -> bool:
    """Whether ``mapped`` (live names) reaches enough live names: a set count, as this
    runs between a notice and the first fetch; ``Intake.coverage`` explains a refusal."""
    required = live.required
    if not required:
        return True
    names = {e.name for e in mapped.tensors}
    reached = {n for n in required if n in names}
    reached.update(n for ts in claimed.values() for n in ts)
    if live.tied:
        for group in live.ties():
            if reached.intersection(group):
                reached.update(group)
    reached &= set(required)
    return bool(reached) and len(reached) / len(required) >= need


def _described(m: Manifest, live: LiveModel) -> Manifest:
    """``m`` without the entries of another dtype than their live tensor's (cast), nor
    slices (the manifest states the whole tensor's norm, not the slice's)."""
    same = tuple(
        e
        for e in m.tensors
        if live.meta.get(e.name, (e.dtype,))[0] == e.dtype and not isinstance(e, SliceEntry)
    )
    return m if len(same) == len(m.tensors) else dataclasses.replace(m, tensors=same)


def _failed(what: str, e: Exception) -> str:
    return str(e) if isinstance(e, ConfigError) else f"{what} raised {type(e).__name__}: {e}"


def _nothing(m: Manifest) -> Staged:
    """A staged version that holds nothing (refused before any fetch)."""
    return Staged(Plan(m, [], {}), {}, {}, 0, 0.0)


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _placeholders(
    entries: Iterable[TensorEntry], claimed: Mapping[str, tuple[str, ...]], live: LiveModel
) -> LiveModel:
    """Empty tensors named as the claimed entries, on the device of the live tensor each
    writes: where ``staging.fetch`` stages them."""
    return LiveModel(
        {
            e.name: torch.empty(
                0,
                dtype=codec.dtype_from_name(e.dtype),
                device=live.tensors[claimed[e.name][0]].device,
            )
            for e in entries
        }
    )


def _check_published(
    name: str, entry: TensorEntry, t: torch.Tensor, policy: validate.Policy
) -> list[str]:
    """The checks a published tensor's own values take (finite, norm as stated); the
    others run on the live tensors the transform wrote."""
    rules = dataclasses.replace(
        policy.rules_for(name), norm_ratio=None, max_relative_change=None, validators=()
    )
    return validate.check_values(name, entry, t, t, rules)
