"""NameMap and coverage, without Redis: how published names map onto live ones, and the hints."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotswap import names
from hotswap.errors import ConfigError
from hotswap.names import NameMap, common_prefix, coverage

LIVE = ["embeddings.word.weight", "encoder.0.weight", "encoder.0.bias", "pooler.weight"]


def test_the_docstring_examples_run() -> None:
    assert doctest.testmod(names).failed == 0


def test_the_identity_map_keeps_every_name() -> None:
    m = NameMap()
    assert m.identity
    assert m.map("a.b") == "a.b"
    assert m.apply(["a", "b"]) == {"a": "a", "b": "b"}


def test_exclude_matches_the_name_as_published_before_the_prefix_is_stripped() -> None:
    m = NameMap(exclude=["bert.embeddings.position_ids"], strip_prefix="bert.")
    assert m.map("bert.embeddings.position_ids") is None
    # The glob names the published name: the stripped one is not excluded.
    assert NameMap(exclude=["embeddings.position_ids"], strip_prefix="bert.").map(
        "bert.embeddings.position_ids"
    ) == ("embeddings.position_ids")


def test_glob_star_matches_across_dots() -> None:
    assert NameMap(exclude=["*.position_ids"]).map("bert.embeddings.position_ids") is None


def test_the_first_matching_prefix_is_stripped_once() -> None:
    m = NameMap(strip_prefix=["module.", "_orig_mod."])
    assert m.map("module._orig_mod.w") == "_orig_mod.w"
    assert m.map("_orig_mod.w") == "w"
    assert m.map("w") == "w"


def test_rename_runs_on_the_stripped_name() -> None:
    m = NameMap(strip_prefix="bert.", rename={"pooler.dense.weight": "pool.w"})
    assert m.map("bert.pooler.dense.weight") == "pool.w"
    assert m.map("bert.other") == "other"


def test_a_rename_callable_returning_none_leaves_the_name_out() -> None:
    m = NameMap(rename=lambda n: None if n.endswith("_ids") else "x." + n)
    assert m.map("position_ids") is None
    assert m.map("w") == "x.w"


def test_a_rename_callable_returning_a_non_string_is_a_config_error() -> None:
    m = NameMap(rename=lambda n: 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rename returned 3 for 'w': expected a str or None"):
        m.map("w")


def test_two_names_mapped_to_one_is_a_config_error_naming_both() -> None:
    m = NameMap(strip_prefix=["module."])
    with pytest.raises(
        ConfigError, match=r"maps both 'module\.w' and 'w' to 'w': exclude one of them"
    ):
        m.apply(["module.w", "w"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strip_prefix": ""}, "strip_prefix '' must be a non-empty string"),
        ({"exclude": [""]}, "exclude glob '' must be a non-empty string"),
        ({"rename": 3}, "rename must be a mapping or a callable, not int"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NameMap(**kwargs)  # type: ignore[arg-type]


def test_a_single_exclude_string_is_one_glob() -> None:
    assert NameMap(exclude="*.b").exclude == ("*.b",)


def test_the_share_that_must_match_is_said_after_the_count() -> None:
    cov = coverage(LIVE[:1], LIVE)
    assert cov.describe(need=0.5).startswith("1 of 4 live tensors matched (at least 50% must); ")
    assert cov.describe(need=0).startswith("1 of 4 live tensors matched; ")


def test_full_coverage() -> None:
    cov = coverage(LIVE, LIVE)
    assert cov.share == 1.0
    assert cov.missing == () and cov.unknown == ()
    assert cov.describe() == "4 of 4 live tensors matched"


def test_the_issue_scenario_names_the_prefix_to_strip() -> None:
    published = ["bert." + n for n in LIVE]
    cov = coverage(published, LIVE)
    assert cov.matched == ()
    assert cov.share == 0.0
    assert cov.describe() == (
        "0 of 4 live tensors matched; the manifest's names start with `bert.`: try "
        "`--strip-prefix bert.`; not matched: 'embeddings.word.weight', "
        "'encoder.0.bias', 'encoder.0.weight' (+1 more); the manifest's names not in the "
        "model: 'bert.embeddings.word.weight', 'bert.encoder.0.bias', 'bert.encoder.0.weight' "
        "(+1 more)"
    )
    assert cov.hint("strip_prefix={!r}") == (
        "the manifest's names start with `bert.`: try `strip_prefix='bert.'`"
    )
    assert coverage(published, LIVE, NameMap(strip_prefix="bert.")).share == 1.0


def test_a_prefix_only_some_names_carry_is_counted() -> None:
    published = ["bert." + LIVE[0], "bert." + LIVE[1], "cls.head.weight"]
    cov = coverage(published, LIVE)
    assert cov.hint() == "2 of the manifest's names match once `bert.` is removed: try " + (
        "`--strip-prefix bert.`"
    )


def test_a_wrapper_prefix_on_the_live_side_is_hinted() -> None:
    live = ["module." + n for n in LIVE]
    cov = coverage(LIVE, live)
    assert cov.hint() == (
        "the live model's names start with `module.` where the manifest's do not: "
        "map them with rename=lambda n: 'module.' + n"
    )


def test_no_hint_when_nothing_relates() -> None:
    cov = coverage(["x.y", "z"], LIVE)
    assert cov.hint() is None
    assert "try" not in cov.describe()


def test_excluded_names_are_counted_apart() -> None:
    cov = coverage([*LIVE, "embeddings.position_ids"], LIVE, NameMap(exclude=["*_ids"]))
    assert cov.excluded == ("embeddings.position_ids",)
    assert cov.unknown == ()
    assert cov.describe() == "4 of 4 live tensors matched; 1 left out by the name map"


def test_an_empty_live_model_is_fully_covered() -> None:
    assert coverage([], []).share == 1.0


def test_common_prefix_ends_at_a_dot() -> None:
    assert common_prefix(["bert.a", "bertx.b"]) == ""
    assert common_prefix(["a.b.c", "a.b.d"]) == "a.b."
    assert common_prefix([]) == ""
    assert common_prefix(["a"]) == ""


segment = st.text(alphabet="abcxyz_0", min_size=1, max_size=4)
dotted = st.lists(segment, min_size=1, max_size=4).map(".".join)


@given(st.sets(dotted, min_size=1, max_size=20), segment)
def test_stripping_an_added_prefix_restores_full_coverage(live: set[str], prefix: str) -> None:
    published = [f"{prefix}.{n}" for n in live]
    assert coverage(published, live, NameMap(strip_prefix=prefix + ".")).share == 1.0
    cov = coverage(published, live)
    # Every live name whose published name differs is missing, and the hint names the prefix.
    assert len(cov.matched) + len(cov.missing) == len(live)
    if cov.missing:
        assert cov.strip_hint is not None


@given(st.sets(dotted, max_size=20), st.sets(dotted, max_size=20))
def test_matched_and_missing_partition_the_live_names(published: set[str], live: set[str]) -> None:
    cov = coverage(published, live)
    assert set(cov.matched) | set(cov.missing) == live
    assert not set(cov.matched) & set(cov.missing)
    assert set(cov.matched) == published & live
    assert set(cov.unknown) == published - live
