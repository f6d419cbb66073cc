"""Intake and the transform's Shadow without Redis: names mapped, coverage counted, copies
made on first access."""

from __future__ import annotations

import doctest
from collections.abc import Mapping
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap import intake, transform, valuecheck
from hotswap.errors import ConfigError, NotFound
from hotswap.intake import Intake, MappedManifests, _described, _enough
from hotswap.live import LiveModel
from hotswap.manifest import Manifest, TensorEntry
from hotswap.names import NameMap
from hotswap.transform import Shadow, Transform
from hotswap.validate import Policy


def entry(name: str) -> TensorEntry:
    return TensorEntry(name, "F32", (2,), 8, "ab" * 32, 65536, 1.0, 1.0)


def manifest(*names: str, version: int = 2) -> Manifest:
    return Manifest(
        model="m",
        version=version,
        parent=None,
        lineage="0" * 32,
        tensors=tuple(entry(n) for n in names),
    )


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(4, 2)
        self.out = torch.nn.Linear(2, 4, bias=False)
        self.out.weight = self.emb.weight
        self.norm = torch.nn.LayerNorm(2)


@pytest.mark.parametrize("module", [intake, transform, valuecheck])
def test_docstring_examples_run(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert attempted > 0 and failed == 0


def test_translate_renames_and_drops_and_keeps_the_rest_of_the_manifest() -> None:
    intake = Intake(NameMap(exclude=["*.position_ids"], strip_prefix="bert."))
    m = manifest("bert.a", "bert.position_ids", "c")
    got = intake.translate(m)
    assert [e.name for e in got.tensors] == ["a", "c"]
    assert (got.version, got.lineage, got.tensors[0].digest) == (2, m.lineage, "ab" * 32)
    assert Intake().translate(m) is m


def test_coverage_counts_tied_twins_and_claimed_names() -> None:
    live = LiveModel(Tied())
    # emb.weight reaches out.weight too; the transform claims norm.weight.
    claims = {"ln.w": ("norm.weight",)}
    cov = Intake().coverage(manifest("emb.weight", "ln.w"), live, claims)
    assert cov.matched == ("emb.weight", "norm.weight", "out.weight")
    assert cov.missing == ("norm.bias",)
    assert _enough(manifest("emb.weight", "ln.w"), live, claims, 0.75)
    assert not _enough(manifest("emb.weight", "ln.w"), live, claims, 0.76)
    assert not _enough(manifest("x"), live, {}, 0.0)  # none reached: never enough


class Old:
    def __init__(self, m: Manifest) -> None:
        self.m = m

    def manifest(self, version: int) -> Manifest:
        return self.m


def test_older_manifests_are_read_through_the_map() -> None:
    intake = Intake(NameMap(strip_prefix=["module."]))
    older = MappedManifests(Old(manifest("module.a", version=1)), intake)
    assert [e.name for e in older.manifest(1).tensors] == ["a"]
    clash = MappedManifests(Old(manifest("module.a", "a", version=1)), intake)
    with pytest.raises(NotFound, match=r"v1 cannot be read through the name map: "):
        clash.manifest(1)
    assert Intake().history(None) is None


def test_a_clash_in_the_map_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="maps both"):
        Intake(NameMap(strip_prefix="module.")).translate(manifest("module.a", "a"))


def test_the_shadow_copies_on_first_access_and_refuses_unclaimed_names() -> None:
    model = Tied()
    live = LiveModel(model)
    shadow = Shadow(live, {"emb.weight", "out.weight"})
    copy = shadow["emb.weight"]
    copy.zero_()
    assert shadow["out.weight"] is copy  # tied names share one copy
    assert not torch.equal(model.emb.weight, copy)  # the live tensor is untouched
    assert list(shadow) == ["emb.weight", "out.weight"] and len(shadow) == 2
    with pytest.raises(KeyError, match=r"'norm\.weight' is not a live tensor the transform"):
        shadow["norm.weight"]


def test_run_returns_the_copies_and_their_reasons() -> None:
    model = Tied()
    live = LiveModel(model)

    def load(published: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> None:
        live["norm.weight"].copy_(published["scale"])

    scale = {"scale": torch.tensor([float("nan"), 1.0])}
    t = Transform(lambda n: "norm.weight", load)
    copies, reasons = transform.run(
        t, scale, live, allowed={"norm.weight"}, policy=Policy(), old_norms={}
    )
    assert list(copies) == ["norm.weight"]
    assert reasons == {"norm.weight": ["1 of 2 values are not finite (NaN or inf)"]}
    assert torch.equal(model.norm.weight, torch.ones(2))
    assert t.targets("x") == ("norm.weight",)
    assert Transform(lambda n: ["a", "b"], load).targets("x") == ("a", "b")


segment = st.text(alphabet="abxy", min_size=1, max_size=3)
dotted = st.lists(segment, min_size=1, max_size=3).map(".".join)


@settings(max_examples=60, deadline=None)
@given(
    st.sets(dotted, max_size=12),
    st.sets(dotted, min_size=1, max_size=12),
    st.sampled_from(["", "a.", "b."]),
    st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)
def test_the_quick_count_agrees_with_the_full_account(
    published: set[str], live_names: set[str], prefix: str, need: float
) -> None:
    names = NameMap(strip_prefix=prefix) if prefix else NameMap()
    intake = Intake(names)
    m = manifest(*published)
    try:
        mapped = intake.translate(m)
    except ConfigError:
        return  # two names onto one: refused before coverage is counted
    live = LiveModel({n: torch.zeros(1) for n in live_names})
    cov = intake.coverage(m, live, {})
    assert _enough(mapped, live, {}, need) == (bool(cov.matched) and cov.share >= need)


def test_entries_cast_on_their_way_in_describe_no_running_bytes() -> None:
    live = LiveModel({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2)})
    m = manifest("a", "b")  # both F32: "a" would run cast to BF16
    assert [e.name for e in _described(m, live).tensors] == ["b"]
    same = manifest("b")
    assert _described(same, live) is same
