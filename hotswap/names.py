"""How a checkpoint's tensor names map onto a live model's, and how well they cover it.

Imports no Redis and no torch. A publisher and an agent use the same
``NameMap``: the publisher to rename a checkpoint before it is published, an
agent to read a published version whose names are not its model's
(``module.``, ``_orig_mod.``, ``bert.``, a buffer the model lacks).
``coverage`` counts the live names a version reaches after the map, and
``Coverage.describe`` says what matched, what did not and, where one exists,
the option that would fix it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from hotswap.errors import ConfigError

Rename = Mapping[str, str] | Callable[[str], str | None]
"""A mapping ``{name: new name}`` (names it lacks are kept), or a callable
returning the new name, or ``None`` to leave the name out."""

# How many names a coverage message spells out on each side.
_SHOWN = 3


class NameMap:
    """Maps a published tensor name to a live one, or to ``None`` (left out).

    Order of operations, on each published name:

    1. ``exclude``: a name matching any glob (``fnmatch``, on the name as
       published; ``*`` also matches dots) is left out.
    2. ``strip_prefix``: the first prefix in the given order that the name
       starts with is removed, once.
    3. ``rename``: applied to the stripped name; a mapping renames the names
       it holds and keeps the others, a callable returns the new name or
       ``None`` to leave the name out.

    Two published names that map to one live name are an error
    (``ConfigError``), raised by ``apply``.

    Args:
        exclude: globs of published names to leave out.
        strip_prefix: a prefix, or prefixes tried in order.
        rename: a mapping or a callable, applied after the prefix is stripped.

    Example:
        >>> names = NameMap(exclude=["*.position_ids"], strip_prefix="bert.",
        ...                 rename={"pooler.dense.weight": "pool.weight"})
        >>> names.map("bert.encoder.layer.0.attention.self.query.weight")
        'encoder.layer.0.attention.self.query.weight'
        >>> names.map("bert.embeddings.position_ids") is None
        True
        >>> names.map("bert.pooler.dense.weight")
        'pool.weight'
    """

    def __init__(
        self,
        exclude: Sequence[str] = (),
        rename: Rename | None = None,
        strip_prefix: str | Sequence[str] = (),
    ) -> None:
        if isinstance(exclude, str):
            exclude = [exclude]
        prefixes = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix)
        for p in prefixes:
            if not isinstance(p, str) or not p:
                raise ConfigError(f"strip_prefix {p!r} must be a non-empty string")
        for g in exclude:
            if not isinstance(g, str) or not g:
                raise ConfigError(f"exclude glob {g!r} must be a non-empty string")
        if rename is not None and not (isinstance(rename, Mapping) or callable(rename)):
            raise ConfigError(
                f"rename must be a mapping or a callable, not {type(rename).__name__}"
            )
        self.exclude: tuple[str, ...] = tuple(exclude)
        self.strip_prefix: tuple[str, ...] = tuple(prefixes)
        self.rename: Rename | None = rename

    @property
    def identity(self) -> bool:
        """True when the map changes no name (no exclude, prefix or rename)."""
        return not (self.exclude or self.strip_prefix or self.rename is not None)

    def map(self, name: str) -> str | None:
        """The live name for published ``name``, or ``None`` if it is left out."""
        if any(fnmatchcase(name, g) for g in self.exclude):
            return None
        for p in self.strip_prefix:
            if name.startswith(p):
                name = name[len(p) :]
                break
        if self.rename is None:
            return name
        if isinstance(self.rename, Mapping):
            return self.rename.get(name, name)
        new = self.rename(name)
        if new is not None and not isinstance(new, str):
            raise ConfigError(f"rename returned {new!r} for {name!r}: expected a str or None")
        return new

    def apply(self, names: Iterable[str]) -> dict[str, str]:
        """``{published name: live name}`` for every name not left out.

        Raises:
            ConfigError: two published names map to one live name, or a name
                maps to the empty string.
        """
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for name in names:
            new = self.map(name)
            if new is None:
                continue
            if not new:
                raise ConfigError(f"the name map maps {name!r} to an empty name")
            if new in seen:
                raise ConfigError(
                    f"the name map maps both {seen[new]!r} and {name!r} to {new!r}: "
                    "exclude one of them or rename it elsewhere"
                )
            seen[new] = name
            out[name] = new
        return out

    def __repr__(self) -> str:
        return (
            f"NameMap(exclude={list(self.exclude)!r}, rename={self.rename!r}, "
            f"strip_prefix={list(self.strip_prefix)!r})"
        )


@dataclass(frozen=True)
class Coverage:
    """Which live names a version reaches after the name map.

    ``matched`` and ``missing`` are live names (sorted); ``unknown`` holds the
    published names that map to no live name (as published), ``excluded``
    those the map left out.
    """

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unknown: tuple[str, ...]
    excluded: tuple[str, ...]
    # A prefix to strip that would match names, and what is said of it.
    strip_hint: tuple[str, str] | None = None
    # A hint when the live names carry a prefix the published ones lack.
    add_hint: str | None = None

    @property
    def live(self) -> int:
        return len(self.matched) + len(self.missing)

    @property
    def share(self) -> float:
        """Matched live names over all live names (1.0 for a model with none)."""
        return len(self.matched) / self.live if self.live else 1.0

    def describe(self, strip_option: str = "--strip-prefix {}", need: float | None = None) -> str:
        """One line: how many live tensors matched, a hint, and which did not match.

        ``strip_option`` is how the caller spells the fix (a CLI flag, or
        ``strip_prefix={!r}`` for an API), formatted with the prefix; ``need``,
        when given, the share that must match (said after the count).

        Example:
            >>> cov = coverage(["bert.a", "bert.b"], ["a", "b"])
            >>> print(cov.describe(need=0.5))  # doctest: +NORMALIZE_WHITESPACE
            0 of 2 live tensors matched (at least 50% must); the manifest's names start with
            `bert.`: try `--strip-prefix bert.`; not matched: 'a', 'b'; the manifest's names
            not in the model: 'bert.a', 'bert.b'
        """
        parts = [f"{len(self.matched)} of {self.live} live tensors matched"]
        if need:
            parts[0] += f" (at least {need:.0%} must)"
        # The fix comes before the lists: a reader (or a record that keeps
        # only a message's start) sees it first.
        hint = self.hint(strip_option)
        if hint is not None:
            parts.append(hint)
        if self.missing:
            parts.append(f"not matched: {_some(self.missing)}")
        if self.unknown:
            parts.append(f"the manifest's names not in the model: {_some(self.unknown)}")
        if self.excluded:
            parts.append(f"{len(self.excluded)} left out by the name map")
        return "; ".join(parts)

    def hint(self, strip_option: str = "--strip-prefix {}") -> str | None:
        """The fix to suggest, if one is found, with ``strip_option`` spelled in."""
        if self.strip_hint is not None:
            prefix, said = self.strip_hint
            return f"{said}: try `{strip_option.format(prefix)}`"
        return self.add_hint


def coverage(
    published: Iterable[str], live: Iterable[str], names: NameMap | None = None
) -> Coverage:
    """How the ``published`` names, mapped by ``names``, cover the ``live`` names.

    Raises:
        ConfigError: the map sends two published names to one live name.

    Example:
        >>> names = NameMap(strip_prefix="module.")
        >>> cov = coverage(["module.w", "module.b"], ["w", "b", "c"], names)
        >>> cov.matched, cov.missing, round(cov.share, 2)
        (('b', 'w'), ('c',), 0.67)
    """
    names = names or NameMap()
    published = list(published)
    live_set = set(live)
    mapped = names.apply(published)
    excluded = tuple(sorted(n for n in published if n not in mapped))
    hit = {new for new in mapped.values() if new in live_set}
    unknown = tuple(sorted(old for old, new in mapped.items() if new not in live_set))
    unknown_mapped = [mapped[old] for old in unknown]
    missing = sorted(live_set - hit)
    return Coverage(
        matched=tuple(sorted(hit)),
        missing=tuple(missing),
        unknown=unknown,
        excluded=excluded,
        strip_hint=_strip_hint(unknown_mapped, missing),
        add_hint=_add_hint(unknown_mapped, missing),
    )


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = len(names) - _SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _dotted_prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.", "a.b."]``: the prefixes that end at a dot."""
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def common_prefix(names: Iterable[str]) -> str:
    """The longest prefix ending at a dot that every name shares (``""`` if none).

    Example:
        >>> common_prefix(["bert.encoder.w", "bert.pooler.w"])
        'bert.'
    """
    names = list(names)
    if not names:
        return ""
    best = ""
    for p in _dotted_prefixes(names[0]):
        if all(n.startswith(p) for n in names):
            best = p
        else:
            break
    return best


def _strip_hint(unknown: Sequence[str], missing: Sequence[str]) -> tuple[str, str] | None:
    """``(prefix, what is said of it)``: a prefix whose removal matches names, if any."""
    if not unknown or not missing:
        return None
    missing_set = set(missing)
    # Prefixes whose removal turns a published name into a missing live one.
    strip = Counter(p for n in unknown for p in _dotted_prefixes(n) if n[len(p) :] in missing_set)
    if not strip:
        return None
    prefix, count = strip.most_common(1)[0]
    if count == len(unknown) or common_prefix(unknown) == prefix:
        return prefix, f"the manifest's names start with `{prefix}`"
    return prefix, f"{count} of the manifest's names match once `{prefix}` is removed"


def _add_hint(unknown: Sequence[str], missing: Sequence[str]) -> str | None:
    """A prefix the live names have and the published ones lack (a wrapper), if any."""
    unknown_set = set(unknown)
    add = Counter(p for n in missing for p in _dotted_prefixes(n) if n[len(p) :] in unknown_set)
    if not add:
        return None
    prefix = add.most_common(1)[0][0]
    return (
        f"the live model's names start with `{prefix}` where the manifest's do not: "
        f"map them with rename=lambda n: {prefix!r} + n"
    )
