"""RunningNorms, without Redis: which live norms an agent knows, and which it never trusts."""

from __future__ import annotations

from hotswap.manifest import Manifest, TensorEntry
from hotswap.norms import RunningNorms
from hotswap.validate import Override, Policy

A, B, C = "ab" * 32, "cd" * 32, "ef" * 32


def entry(name: str, digest: str, norm: float) -> TensorEntry:
    return TensorEntry(name, "F32", (2,), 8, digest, 65536, norm, norm)


def manifest(*entries: TensorEntry) -> Manifest:
    return Manifest(model="m", version=1, parent=None, lineage="0" * 32, tensors=entries)


def test_nothing_is_known_before_anything_is_learned() -> None:
    assert RunningNorms(Policy()).known({"w": A, "b": B}) == {}


def test_learns_the_norms_a_manifest_states_for_bytes_that_run() -> None:
    norms = RunningNorms(Policy())
    norms.learn(manifest(entry("w", A, 2.0), entry("b", C, 3.0)), {"w": A, "b": B})
    # "b" runs other bytes than the manifest's: nothing is learned about either.
    assert norms.known({"w": A, "b": B}) == {"w": 2.0}
    assert norms.known({"b": C}) == {}


def test_a_manifest_about_other_bytes_does_not_replace_a_known_norm() -> None:
    norms = RunningNorms(Policy())
    norms.applied({"w": entry("w", A, 2.0)}, {"w": 2.0})
    norms.learn(manifest(entry("w", B, 5.0)), {"w": A})
    assert norms.known({"w": A}) == {"w": 2.0}
    assert norms.known({"w": B}) == {}


def test_a_digest_that_no_longer_runs_gives_no_known_norm() -> None:
    norms = RunningNorms(Policy())
    norms.learn(manifest(entry("w", A, 2.0)), {"w": A})
    assert norms.known({"w": B}) == {}
    assert norms.known({"w": A}) == {"w": 2.0}


def test_a_norm_already_known_for_the_same_bytes_is_kept() -> None:
    norms = RunningNorms(Policy())
    norms.applied({"w": entry("w", A, 2.0)}, {"w": 2.0})
    norms.learn(manifest(entry("w", A, 5.0)), {"w": A})
    assert norms.known({"w": A}) == {"w": 2.0}


def test_a_name_whose_norm_the_policy_does_not_check_learns_nothing() -> None:
    policy = Policy(overrides={"w": Override(check_norm=False)})
    norms = RunningNorms(policy)
    norms.learn(manifest(entry("w", A, 1e6), entry("b", B, 3.0)), {"w": A, "b": B})
    assert norms.known({"w": A, "b": B}) == {"b": 3.0}
    off = RunningNorms(Policy(check_norm=False))
    off.learn(manifest(entry("w", A, 2.0)), {"w": A})
    assert off.known({"w": A}) == {}


def test_applied_keeps_only_the_norms_validation_checked() -> None:
    norms = RunningNorms(Policy())
    norms.learn(manifest(entry("w", A, 2.0), entry("b", B, 3.0)), {"w": A, "b": B})
    changed = {"w": entry("w", C, 4.0), "b": entry("b", A, 5.0)}
    norms.applied(changed, {"w": 4.0})
    # "b" changed without a checked norm: what was known of its old bytes is gone.
    assert norms.known({"w": C, "b": A}) == {"w": 4.0}
    assert norms.known({"w": A, "b": B}) == {}


def test_applied_leaves_unchanged_names_alone() -> None:
    norms = RunningNorms(Policy())
    norms.learn(manifest(entry("w", A, 2.0), entry("b", B, 3.0)), {"w": A, "b": B})
    norms.applied({"w": entry("w", C, 4.0)}, {"w": 4.0})
    assert norms.known({"w": C, "b": B}) == {"w": 4.0, "b": 3.0}
