"""Checks before upload: a publish compared with head, and its values, before a byte is sent.

Imports no Redis: these functions read the source and head's manifest, and
raise. In the order ``before_upload`` runs them:

1. **Coverage** (a trusted head, not ``force``): the share of head's names
   that the publish's names (after the name map) match, or for ``only`` the
   share of its names head has, must be at least ``MIN_SHARE``. Below it the
   checkpoint's names do not fit the model (``bert.`` in front, another
   architecture) and the error says what matched, what did not and the fix.
   Names are counted, not changed tensors, so a publish of one layer
   (``only``) that head has is covered.
2. **Completeness** (a full publish): ``publisher.complete``.
3. **Names, shapes, dtypes** (a trusted head, not ``force``): every tensor
   must be one head has, with head's shape and dtype: agents of the model
   would refuse any other. Read from the source's headers where it has them.
4. **Values** (``check``, a ``Policy``): finite values and norm ratios, by
   ``hotswap.validate.check_values`` against head's manifest norms.

A model's first version is compared with nothing: it sets the names, shapes
and dtypes later publishes are held to, and agents' own checks are the only
gate for it (a ``check`` policy still looks at its values). An untrusted
head (``Head.distrust``) is not compared with either: a full publish is how
it is repaired.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from hotswap import names as nm
from hotswap import validate
from hotswap.errors import ConfigError, SourceError, ValidationError
from hotswap.manifest import Manifest, TensorEntry
from hotswap.validate import Policy
from publisher import complete
from publisher.plan import Head
from publisher.sources import TensorSource

MIN_SHARE = 0.5
"""Least share of head's names a publish must match (by name, after the name map)
before it is compared tensor by tensor; below it, the names do not fit the model."""

# Tensors a refusal spells out; the rest are counted (the message stays one line).
SHOWN = 5

# The --dtype that would cast a float tensor to head's dtype.
_CAST_FOR = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def before_upload(
    src: TensorSource,
    names: Sequence[str],
    parent: Head,
    *,
    only: Sequence[str] | None,
    exclude: Sequence[str],
    force: bool,
    check: Policy | None,
) -> None:
    """Refuse, before anything is hashed or sent, a publish that agents would refuse.

    ``names`` are the published names chosen (after the name map, ``only``
    and ``exclude``); ``parent`` is head.

    Raises:
        SourceError: no name left, coverage under ``MIN_SHARE``, a full
            publish lacking tensors of head, or tensors not in head or with
            another shape or dtype (coverage and the last two not with ``force``).
        ConfigError: ``only`` without a version to inherit from.
        HotswapError: ``only`` on an untrusted head (the class of why not).
        ValidationError: ``check`` refused values (``reasons`` per tensor).
    """
    if not names:
        raise SourceError(f"{src.where}: exclude leaves no tensor to publish")
    if only is not None:
        parent_for_only(parent)
    head = parent.manifest
    if head is not None and not force:
        covers(head, names, src.where, only=only is not None, exclude=exclude)
    if only is None:
        complete.check(head, names, exclude, src.where)
    if head is not None and not force:
        fits(head, src, names)
    if check is not None:
        values(src, names, head, check, parent.model)


def covers(
    head: Manifest, names: Sequence[str], where: str, *, only: bool, exclude: Sequence[str]
) -> None:
    """SourceError if ``names`` match less than ``MIN_SHARE`` of head's names.

    A full publish is measured against head's names that ``exclude`` does
    not drop; an ``only`` publish by the share of its own names head has.
    """
    wanted = [t.name for t in head.tensors if not complete.is_excluded(t.name, exclude)]
    hit, total = len(set(names) & set(wanted)), (len(names) if only else len(wanted))
    if not total or hit / total >= MIN_SHARE:
        return
    cov = nm.coverage(names, wanted)  # only now: its hints cost a pass over every name
    what = "of its tensors are in" if only else "tensors matched"
    parts = [f"{where}: {hit} of {total} {what} head v{head.version}'s names"]
    if cov.missing and not only:
        parts.append(f"head's names not matched: {_some(cov.missing)}")
    if cov.unknown:
        parts.append(f"names head lacks: {_some(cov.unknown)}")
    parts.append(_hint(cov))
    raise SourceError("; ".join(parts))


def _hint(cov: nm.Coverage) -> str:
    """What would make the names fit, as both API and CLI spell it."""
    if cov.strip_hint is not None:
        prefix = cov.strip_hint[0]
        every = all(n.startswith(prefix) for n in cov.unknown)
        said = "the names start with" if every else "some names match once you remove"
        return f"{said} `{prefix}`: try strip_prefix={prefix!r} (--strip-prefix {prefix})"
    if cov.add_hint is not None:
        prefix = nm.common_prefix(cov.missing)
        if prefix:
            return (
                f"head's names start with `{prefix}` where these do not: map them with "
                f"rename=lambda n: {prefix!r} + n, or --rename OLD=NEW for each"
            )
    return (
        "is it a checkpoint of another model? Map its names with strip_prefix, rename and "
        "exclude (--strip-prefix, --rename, --exclude), or publish it under another model name"
    )


def fits(head: Manifest, src: TensorSource, names: Iterable[str]) -> None:
    """SourceError listing every tensor head lacks or holds with another shape or dtype.

    Tensors with one reason are listed together (a checkpoint in another
    dtype differs in every float tensor, for one reason).
    """
    theirs = head.by_name()
    v = f"head v{head.version}"
    by_reason: dict[str, list[str]] = {}
    count = 0
    for name in names:
        entry = theirs.get(name)
        if entry is None:
            why = [f"not in {v} (leave them out with exclude=[GLOB], --exclude GLOB)"]
        else:
            dtype, shape = src.meta(name)
            why = []
            if list(shape) != list(entry.shape):
                why.append(f"shape {list(shape)} where {v} has {list(entry.shape)}")
            if dtype != entry.dtype:
                why.append(f"dtype {dtype} where {v} has {entry.dtype}{_cast(entry)}")
        if why:
            by_reason.setdefault("; ".join(why), []).append(name)
            count += 1
    if not by_reason:
        return
    listed = [f"{why}: {_some(sorted(found))}" for why, found in by_reason.items()]
    shown = " | ".join(listed[:SHOWN])
    more = f" | and {len(listed) - SHOWN} more reasons" if len(listed) > SHOWN else ""
    raise SourceError(
        f"{src.where}: {count} tensor(s) do not fit {v}, and agents would refuse them: "
        f"{shown}{more}; nothing was uploaded; pass force=True (--force) if the model "
        "itself changed"
    )


def _cast(entry: TensorEntry) -> str:
    to = _CAST_FOR.get(entry.dtype)
    return f" (cast with dtype={to!r}, --dtype {to})" if to else ""


def values(
    src: TensorSource, names: Iterable[str], head: Manifest | None, policy: Policy, model: str
) -> None:
    """ValidationError if ``policy`` refuses any tensor's values.

    Of the policy, the publisher applies ``check_finite`` and ``norm_ratio``
    (each tensor's norm over head's manifest norm for that name), overrides
    included; ``check_norm``, ``max_relative_change`` and ``validators`` need
    the live tensor and stay with agents.
    """
    theirs = head.by_name() if head is not None else {}
    reasons: dict[str, list[str]] = {}
    for name in names:
        tensor = src.load(name)
        old = theirs.get(name)
        old_norm = old.norm if old is not None and math.isfinite(old.norm) else None
        rules = policy.rules_for(name)
        rules = replace(
            rules,
            check_norm=False,
            max_relative_change=None,
            validators=(),
            norm_ratio=rules.norm_ratio if old_norm is not None else None,
        )
        # ``entry`` is read only by the norm-consistency check, off here.
        entry = old or _placeholder(name)
        found = validate.check_values(name, entry, tensor, tensor, rules, old_norm=old_norm)
        if found:
            reasons[name] = found
        del tensor
    if not reasons:
        return
    listed = [f"{name!r}: {'; '.join(why)}" for name, why in sorted(reasons.items())]
    shown = " | ".join(listed[:SHOWN])
    more = f" | and {len(listed) - SHOWN} more" if len(listed) > SHOWN else ""
    raise ValidationError(
        f"model {model!r}: {src.where} refused before upload, {len(listed)} tensor(s) failed "
        f"the check: {shown}{more}; nothing was uploaded",
        reasons,
    )


def _placeholder(name: str) -> TensorEntry:
    return TensorEntry(name, "F32", (0,), 0, "0" * 64, 1, math.nan, math.nan)


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def parent_for_only(head: Head) -> None:
    """Refuse an ``only`` publish without a trusted head to inherit the other tensors from.

    Raises:
        ConfigError: the model has no version yet.
        HotswapError: head cannot be trusted (the class of why not).
    """
    if head.number is None:
        raise ConfigError(
            f"model {head.model!r} has no version yet: --only needs a parent to inherit "
            "the other tensors from; publish the whole model first"
        )
    if head.manifest is None:
        raise head.refusal("--only inherits the other tensors from it") from head.distrust
