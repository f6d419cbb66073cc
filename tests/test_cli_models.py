"""Issue 15, CLI completeness: export, models, delete, unknown models, gc's grace, counts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import test_cli
import torch
from pydantic import SecretStr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import N, snapshot, weights

from hotswap import keys
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

READS = [
    ("status", "{m}"),
    ("log", "{m}"),
    ("show", "{m}"),
    ("diff", "{m}", "1", "2"),
    ("verify", "{m}"),
    ("export", "{m}", "{out}"),
    ("gc", "{m}", "--dry-run"),
    ("rollback", "{m}"),
    ("resign", "{m}"),
    ("delete", "{m}", "--yes"),
]

# The command-line fixtures of test_cli: the real environment, the in-process command.
env = test_cli.env
run = test_cli.run


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("minilm", settings=settings, connection=client)
    yield p
    p.close()


def keys_of(client: redis.Redis, model: str) -> dict[bytes, bytes | None]:
    found = {}
    for pattern in keys.namespace_pattern("hotswap", model):
        found.update({k: client.dump(k) for k in client.scan_iter(match=pattern)})
    return found


@pytest.mark.parametrize("args", READS, ids=[a[0] for a in READS])
def test_an_unknown_model_is_an_error_naming_the_closest(
    args: tuple[str, ...], run: Any, pub: Publisher, client: redis.Redis, tmp_path: Path
) -> None:
    pub.publish(weights(0))
    before = snapshot(client)
    out_file = tmp_path / "out.safetensors"
    code, out, err = run(*(a.format(m="minlm", out=out_file) for a in args))
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'minlm' is not in Redis (namespace 'hotswap'); did you mean "
        "'minilm'?; `hotswap models` lists the models there\n"
    )
    assert snapshot(client) == before and not out_file.exists()


def test_export_reconstructs_deltas_and_writes_the_manifests_names(
    run: Any, pub: Publisher, store: Store, client: redis.Redis, tmp_path: Path
) -> None:
    first = {**weights(0), "half": torch.randn(8, 4).to(torch.bfloat16), "tied": torch.ones(3)}
    first["tied.too"] = first["tied"]
    pub.publish(first)
    second = {k: v.clone() for k, v in first.items()}
    second["layer.0.weight"][:10] += 1.0  # a small change: stored as a delta
    pub.publish(second)
    m = Store(client, "minilm").manifest(2)
    assert m.by_name()["layer.0.weight"].delta is not None
    before = snapshot(client)
    out = tmp_path / "v2.safetensors"
    code, text, err = run("export", "minilm", str(out), "--json")
    assert code == 0, err
    data = json.loads(text)
    assert (data["version"], data["tensors"], data["path"]) == (2, 9, str(out))
    got = load_file(str(out))
    assert list(got) == sorted(second) or set(got) == set(second)
    for name, t in second.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"hotswap.model": "minilm", "hotswap.version": "2"}
    assert snapshot(client) == before  # read-only: not even a blob's grace clock moved
    code, text, _ = run("export", "minilm", "1", str(tmp_path / "v1.safetensors"))
    assert code == 0 and text.startswith("model minilm: exported v1 to ")
    assert torch.equal(
        load_file(str(tmp_path / "v1.safetensors"))["layer.0.weight"], first["layer.0.weight"]
    )
    # An existing file is not overwritten without --force, and is left as it was.
    code, text, err = run("export", "minilm", "1", str(out))
    assert (code, err) == (1, f"hotswap: error: {out} exists; pass --force to overwrite it\n")
    assert torch.equal(load_file(str(out))["layer.0.weight"], second["layer.0.weight"])
    assert run("export", "minilm", "1", str(out), "--force")[0] == 0
    assert torch.equal(load_file(str(out))["layer.0.weight"], first["layer.0.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.safetensors", "v2.safetensors"]


def test_export_of_an_unsigned_version_once_signing_is_on_needs_allow_unsigned(
    run: Any, pub: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub.publish(weights(0))
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", "a-signing-key-0123456789abcdef")
    out = tmp_path / "v1.safetensors"
    code, text, err = run("export", "minilm", str(out))
    assert (code, text) == (1, "") and not out.exists()
    assert err.startswith("hotswap: error: manifest of minilm v1 is unsigned, but signing keys")
    assert err.endswith(
        "; pass --allow-unsigned to export it anyway (to publish it again, "
        "signed with the current key)\n"
    )
    code, text, err = run("export", "minilm", str(out), "--allow-unsigned")
    assert code == 0 and "exported v1 (not signed: read anyway) to" in text
    # ... and published again, signed: what turning signing on needed.
    signed = pub.settings.model_copy(
        update={"signing_keys": [SecretStr("a-signing-key-0123456789abcdef")]}
    )
    with Publisher("minilm", settings=signed, connection=pub.client) as p:
        assert p.publish(str(out), force=True) == 2
    assert run("show", "minilm")[0] == 0


def test_models_lists_every_model_with_sizes(
    run: Any, settings: HotswapSettings, client: redis.Redis
) -> None:
    code, out, _ = run("models")
    assert code == 0 and "no models" in out
    for name, seed in (("m", 0), ("m-2", 1)):
        with Publisher(name, settings=settings, connection=client) as p:
            p.publish(weights(seed))
    code, out, _ = run("models", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert sorted(rows) == ["m", "m-2"]
    blobs = sum(client.strlen(k) for k in client.scan_iter(match=b"hotswap:m:blob:*"))
    assert rows["m"]["stored_bytes"] == blobs == 6 * 4 * 64 * 1024
    assert (rows["m"]["head"], rows["m"]["versions"], rows["m"]["tensors"]) == (1, 1, 6)
    assert rows["m"]["model_bytes"] == 6 * 4 * 64 * 1024 and rows["m"]["live_agents"] == 0
    code, out, _ = run("models")
    assert code == 0 and "m-2" in out and "1.6 MB" in out


def test_delete_asks_then_deletes_every_key_of_that_model_only(
    run: Any,
    settings: HotswapSettings,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io
    import sys

    for name, seed in (("m", 0), ("m-2", 0)):  # the same bytes: blobs are per model
        with Publisher(name, settings=settings, connection=client) as p:
            p.publish(weights(seed))
            p.publish(weights(seed + 1))
    other = keys_of(client, "m-2")
    before = snapshot(client)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = run("delete", "m")
    assert (code, out) == (1, "")
    assert err.endswith("hotswap: error: model 'm': nothing deleted (answer y, or pass --yes)\n")
    assert "delete model 'm' (head v2, 2 versions stored, 3.1 MB of blobs, 0 live agents)?" in err
    assert snapshot(client) == before
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no answer: no
    assert run("delete", "m")[0] == 1 and snapshot(client) == before
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, out, _ = run("delete", "m")
    assert code == 0 and out.startswith("model m: deleted ")
    assert keys_of(client, "m") == {} and keys_of(client, "m-2") == other
    assert snapshot(client) == other
    code, out, _ = run("models", "--json")
    assert [r["model"] for r in json.loads(out)] == ["m-2"]
    code, out, _ = run("delete", "m-2", "--yes", "--json")
    assert code == 0 and json.loads(out)["keys_deleted"] == len(other)
    assert snapshot(client) == {}


def test_gc_says_what_the_grace_period_kept_and_grace_0_collects_it(
    run: Any, settings: HotswapSettings, client: redis.Redis
) -> None:
    with Publisher("m", settings=settings, connection=client) as p:
        for seed in range(3):
            p.publish(weights(seed))
    code, out, _ = run("gc", "m", "--keep", "1")
    assert code == 0
    assert "deleted v1, v2 and 0 blobs" in out
    assert (
        "kept 12 unreferenced blobs a publish touched within the 60 min grace period "
        "(HOTSWAP_GC_GRACE_SECONDS); collectable in 60 min (run gc again then, or "
        "`--grace 0` when no publish is running)" in out
    )
    code, out, err = run("gc", "m", "--grace", "-1")
    assert (code, err) == (1, "hotswap: error: --grace must be 0 or more seconds, got -1\n")
    code, out, _ = run("gc", "m", "--keep", "1", "--grace", "0", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and data["blobs_deleted"] == 12 and data["young_until"] is None
    assert data["bytes_freed"] == 12 * 4 * N and data["dry_run"] is True
    code, out, _ = run("gc", "m", "--keep", "1", "--grace", "0")
    assert code == 0 and "deleted no versions and 12 blobs (3.1 MB)" in out
    assert run("verify", "m")[0] == 0


def test_counts_say_what_was_removed(
    run: Any, settings: HotswapSettings, client: redis.Redis, tmp_path: Path
) -> None:
    with Publisher("m", settings=settings, connection=client) as p:
        p.publish(weights(0))
    sd = weights(0)
    sd["layer.0.weight"] = sd["layer.0.weight"] + 1
    del sd["layer.2.bias"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    code, out, err = run(
        "publish", "m", str(tmp_path / "m.safetensors"), "--exclude", "layer.2.bias"
    )
    assert code == 0, err
    assert out.startswith(
        "model m: published v2: 1 of 5 tensors changed, 1 removed: agents refuse a version "
        "that lacks tensors they serve unless their Policy(missing_tensors='keep'), "
    )
    code, out, _ = run("rollback", "m")
    assert out.startswith("model m: rolled back to v1 as v3 (2 of 6 tensors differ from v2; ")
    code, out, _ = run("log", "m", "--json")
    rows = json.loads(out)
    assert [(r["tensors_changed"], r["tensors_removed"]) for r in rows] == [(2, 0), (1, 1), (6, 0)]
    code, out, _ = run("log", "m")
    assert "1, 1 removed" in next(line for line in out.splitlines() if " v2 │" in line)


def test_diff_names_its_norm_column_honestly_and_values_gives_the_distance(
    run: Any, settings: HotswapSettings, client: redis.Redis
) -> None:
    first = weights(0)
    second = {k: v.clone() for k, v in first.items()}
    second["layer.0.bias"] += 0.5  # every element: ||d|| = 0.5 * sqrt(N) = 128
    second["layer.1.bias"][:4] *= -1  # the norm stays, the values move
    with Publisher("m", settings=settings, connection=client) as p:
        p.publish(first)
        p.publish(second)
    before = snapshot(client)
    code, out, _ = run("diff", "m", "1", "2", "--json")
    rows = {c["name"]: c for c in json.loads(out)["changed"]}
    assert code == 0 and rows["layer.1.bias"]["norm_change"] == pytest.approx(0, abs=1e-3)
    assert rows["layer.1.bias"]["distance"] is None and "norm_delta" not in rows["layer.1.bias"]
    code, out, _ = run("diff", "m", "1", "2", "--values", "--json")
    rows = {c["name"]: c for c in json.loads(out)["changed"]}
    assert rows["layer.0.bias"]["distance"] == pytest.approx(128, rel=1e-4)
    assert rows["layer.0.bias"]["max_abs_change"] == pytest.approx(0.5, rel=1e-4)
    flipped = first["layer.1.bias"][:4].double()
    assert rows["layer.1.bias"]["distance"] == pytest.approx(float(2 * flipped.norm()), rel=1e-6)
    code, out, _ = run("diff", "m", "1", "2", "--values")
    header = next(line for line in out.splitlines() if "norm change" in line)
    assert code == 0 and "‖new-old‖" in header
    code, out, _ = run("diff", "m", "1", "2")
    assert "--values adds ‖new-old‖" in out and "‖new-old‖ │" not in out
    assert snapshot(client) == before
