"""Checks before upload (publisher.precheck) against the test Redis: a refused publish
writes nothing, in Python and from the command line."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import save_file

from hotswap import codec
from hotswap.agent import Agent
from hotswap.errors import ConfigError, SourceError, ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Override, Policy
from publisher import cli
from publisher.precheck import MIN_SHARE
from publisher.publisher import Publisher


def weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer.{i}.{k}": torch.randn(8, 8, generator=g) for i in range(3) for k in "wb"}
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["steps"] = torch.tensor(7)
    return sd


def prefixed(sd: dict[str, torch.Tensor], prefix: str = "bert.") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings, connection=client)
    yield p
    p.close()


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {k: client.dump(k) for k in client.keys("*")}


def refused(
    pub: Publisher, client: redis.Redis, error: type[Exception], *args: Any, **kwargs: Any
) -> str:
    """The message of the error ``pub.publish(*args, **kwargs)`` raises, having
    checked that Redis is byte for byte as it was (head, keys, values)."""
    before = snapshot(client)
    head = Store(client, "m").head()
    with pytest.raises(error) as e:
        pub.publish(*args, **kwargs)
    assert Store(client, "m").head() == head
    assert len(before) == client.dbsize() and snapshot(client) == before
    return str(e.value)


def test_a_first_publish_is_compared_with_nothing(pub: Publisher, store: Store) -> None:
    assert pub.publish(prefixed(weights())) == 1
    assert {e.name for e in store.manifest(1).tensors} == set(prefixed(weights()))


def test_names_that_match_too_little_of_head_are_refused_with_the_fix(
    pub: Publisher, client: redis.Redis
) -> None:
    pub.publish(weights())
    message = refused(pub, client, SourceError, prefixed(weights(1)))
    assert message == (
        "state dict: 0 of 7 tensors matched head v1's names; head's names not matched: "
        "'layer.0.b', 'layer.0.w', 'layer.1.b' (+4 more); names head lacks: 'bert.layer.0.b', "
        "'bert.layer.0.w', 'bert.layer.1.b' (+4 more); the names start with `bert.`: try "
        "strip_prefix='bert.' (--strip-prefix bert.)"
    )
    # Mapped, the same weights are head's: nothing new, head's number back.
    assert pub.publish(prefixed(weights()), strip_prefix="bert.") == 1
    assert not pub.last_report.created
    assert pub.publish(prefixed(weights(1)), strip_prefix=["module.", "bert."]) == 2


def test_a_wrapper_prefix_head_has_is_named_and_another_model_is_called_so(
    pub: Publisher, client: redis.Redis
) -> None:
    pub.publish(prefixed(weights(), "model."))
    message = refused(pub, client, SourceError, weights(1))
    assert message.endswith(
        "head's names start with `model.` where these do not: map them with "
        "rename=lambda n: 'model.' + n, or --rename OLD=NEW for each"
    )
    assert pub.publish(weights(1), rename=lambda n: "model." + n) == 2
    other = {"encoder.w": torch.zeros(4), "decoder.w": torch.zeros(4)}
    assert refused(pub, client, SourceError, other).endswith(
        "is it a checkpoint of another model? Map its names with strip_prefix, rename and "
        "exclude (--strip-prefix, --rename, --exclude), or publish it under another model name"
    )


def test_coverage_counts_names_so_a_one_layer_publish_is_covered(
    pub: Publisher, client: redis.Redis, store: Store
) -> None:
    pub.publish(weights())
    sd = weights()
    sd["layer.0.w"] = sd["layer.0.w"] * 2
    assert pub.publish(sd, only=["layer.0.*"]) == 2
    assert pub.last_report.tensors_changed == 1
    # The share below which a publish's names do not fit is documented.
    assert MIN_SHARE == 0.5
    message = refused(pub, client, SourceError, prefixed(sd), only=["bert.layer.0.*"])
    assert message.startswith("state dict: 0 of 2 of its tensors are in head v2's names; ")
    assert message.endswith(
        "the names start with `bert.`: try strip_prefix='bert.' (--strip-prefix bert.)"
    )
    # Half of head's names is enough to be compared tensor by tensor: a full
    # publish lacking the other half is then refused by name.
    half = {k: v for k, v in weights().items() if k.startswith(("layer.0", "layer.1"))}
    assert refused(pub, client, SourceError, half).startswith(
        "state dict: a full publish lacks 3 tensors of head v2 ('layer.2.b', 'layer.2.w', 'steps')"
    )
    assert store.head() == 2


def test_other_names_shapes_and_dtypes_are_refused_unless_forced(
    pub: Publisher, client: redis.Redis, store: Store
) -> None:
    pub.publish(weights())
    sd = weights(1)
    sd["layer.0.w"] = torch.randn(4, 8)
    sd["layer.1.w"] = sd["layer.1.w"].double()
    sd["layer.1.b"] = sd["layer.1.b"].half()
    sd["extra"] = torch.zeros(2)
    assert refused(pub, client, SourceError, sd) == (
        "state dict: 4 tensor(s) do not fit head v1, and agents would refuse them: "
        "not in head v1 (leave them out with exclude=[GLOB], --exclude GLOB): 'extra' | "
        "shape [4, 8] where head v1 has [8, 8]: 'layer.0.w' | "
        "dtype F16 where head v1 has F32 (cast with dtype='fp32', --dtype fp32): 'layer.1.b' | "
        "dtype F64 where head v1 has F32 (cast with dtype='fp32', --dtype fp32): 'layer.1.w'; "
        "nothing was uploaded; pass force=True (--force) if the model itself changed"
    )
    assert pub.publish(sd, force=True) == 2
    shapes = {e.name: (e.dtype, e.shape) for e in store.manifest(2).tensors}
    assert shapes["layer.0.w"] == ("F32", (4, 8)) and shapes["extra"] == ("F32", (2,))


def test_a_cast_publishes_the_cast_bytes_and_an_agent_applies_them(
    pub: Publisher, client: redis.Redis, store: Store, settings: HotswapSettings
) -> None:
    served = weights(0, torch.bfloat16)
    model = torch.nn.Module()
    for name, value in served.items():
        model.register_buffer(name.replace(".", "_"), value.clone())
    live = {name.replace(".", "_"): v for name, v in served.items()}
    assert pub.publish(live) == 1
    trained = {name.replace(".", "_"): v for name, v in weights(1).items()}  # fp32
    message = refused(pub, client, SourceError, trained)
    assert "dtype F32 where head v1 has BF16 (cast with dtype='bf16', --dtype bf16): " in message
    with Agent(model, "m", settings=settings) as agent:
        assert agent.wait_for(1, 10)
        assert pub.publish(trained, dtype="bf16") == 2
        assert agent.wait_for(2, 10)
    entries = store.manifest(2).by_name()
    for name, value in trained.items():
        published = value.bfloat16() if value.is_floating_point() else value
        assert entries[name].dtype == codec.dtype_name(published.dtype)
        # The digest agents check is over the bytes as published.
        assert entries[name].digest == codec.digest(codec.as_bytes(published))
        assert torch.equal(getattr(model, name), published)


def test_check_refuses_values_before_upload_with_the_agents_policy(
    pub: Publisher, client: redis.Redis, store: Store
) -> None:
    pub.publish(weights())
    nan = weights(1)
    nan["layer.0.w"][0, :3] = float("nan")
    nan["layer.2.b"] = nan["layer.2.b"] * 100
    message = refused(pub, client, ValidationError, nan, check=Policy())
    ratio = math.sqrt(nan["layer.2.b"].double().pow(2).sum().item())
    head_norm = store.manifest(1).by_name()["layer.2.b"].norm
    assert message == (
        "model 'm': state dict refused before upload, 2 tensor(s) failed the check: "
        "'layer.0.w': 3 of 64 values are not finite (NaN or inf) | "
        f"'layer.2.b': norm ratio new/old {ratio / head_norm:.6g} is outside [0.1, 10] "
        f"(norm {head_norm:.6g} -> {ratio:.6g}); nothing was uploaded"
    )
    with pytest.raises(ValidationError) as e:
        pub.publish(nan, check=Policy())
    assert set(e.value.reasons) == {"layer.0.w", "layer.2.b"}
    # The policy's overrides apply as they do in agents.
    lenient = Policy(
        overrides={"layer.0.w": Override(check_finite=False), "*.b": Override(norm_ratio=None)}
    )
    assert pub.publish(nan, check=lenient) == 2
    # Without check the publisher leaves values to agents (the documented default).
    assert pub.publish(weights(2)) == 3


def test_a_bad_rename_or_dtype_is_refused_before_anything_is_read(
    pub: Publisher, client: redis.Redis
) -> None:
    assert refused(pub, client, ConfigError, weights(), dtype="int8") == (
        "dtype 'int8' is not one a publish casts to; choose one of bf16, fp16, fp32"
    )
    assert refused(pub, client, ConfigError, weights(), strip_prefix="") == (
        "strip_prefix '' must be a non-empty string"
    )
    assert refused(pub, client, SourceError, weights(), rename=lambda n: None) == (
        "state dict: exclude leaves no tensor to publish"
    )


# -- the command line ------------------------------------------------------------


@pytest.fixture
def run(server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    for k in [k for k in os.environ if k.startswith("HOTSWAP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.chdir("/")

    def call(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_cli_refuses_with_the_message_and_maps_with_options(
    run: Any, pub: Publisher, client: redis.Redis, store: Store, tmp_path: Path
) -> None:
    pub.publish(weights(0, torch.bfloat16))
    ckpt = prefixed(weights(1))
    ckpt["bert.pooler.w"] = ckpt.pop("bert.layer.2.w")
    ckpt["bert.embeddings.position_ids"] = torch.arange(4)
    path = tmp_path / "model.safetensors"
    save_file(ckpt, str(path))
    before = snapshot(client)
    code, out, err = run("publish", "m", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"hotswap: error: {path}: 0 of 7 tensors matched head v1's names; ")
    assert err.endswith("try strip_prefix='bert.' (--strip-prefix bert.)\n")
    code, out, err = run("publish", "m", str(path), "--strip-prefix", "bert.")
    assert (code, out) == (1, "")
    assert err.startswith(
        f"hotswap: error: {path}: a full publish lacks 1 tensor of head v1 ('layer.2.w'); "
    )
    code, out, err = run(
        "publish", "m", str(path), "--strip-prefix", "bert.", "--rename", "pooler.w=layer.2.w"
    )
    assert (code, out) == (1, "")
    # Six float tensors in F32 and a buffer the model lacks (as older BERT files have).
    assert err.startswith(f"hotswap: error: {path}: 7 tensor(s) do not fit head v1, ")
    assert "dtype F32 where head v1 has BF16 (cast with dtype='bf16', --dtype bf16): " in err
    assert "--exclude GLOB): 'embeddings.position_ids'" in err
    assert snapshot(client) == before
    code, out, err = run(
        "publish",
        "m",
        str(path),
        "--strip-prefix",
        "bert.",
        "--rename",
        "pooler.w=layer.2.w",
        "--exclude",
        "*.position_ids",
        "--dtype",
        "bf16",
        "--check",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["version"] == 2
    entries = store.manifest(2).by_name()
    assert set(entries) == set(weights()) and entries["layer.2.w"].dtype == "BF16"
    assert entries["layer.2.w"].digest == codec.digest(
        codec.as_bytes(ckpt["bert.pooler.w"].bfloat16())
    )
    code, _, err = run("publish", "m", str(path), "--rename", "pooler.w")
    assert (code, err) == (1, "hotswap: error: --rename 'pooler.w': expected OLD=NEW\n")
    code, _, err = run("publish", "m", str(path), "--dtype", "int8")
    assert code == 2 and "invalid choice: 'int8'" in err


def test_cli_check_refuses_nan_with_exit_1_and_writes_nothing(
    run: Any, pub: Publisher, client: redis.Redis, tmp_path: Path
) -> None:
    pub.publish(weights())
    sd = weights(1)
    sd["layer.1.w"][2, 2] = float("inf")
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    before = snapshot(client)
    code, out, err = run("publish", "m", str(path), "--check")
    assert (code, out) == (1, "")
    assert err == (
        f"hotswap: error: model 'm': {path} refused before upload, 1 tensor(s) failed the "
        "check: 'layer.1.w': 1 of 64 values are not finite (NaN or inf); nothing was uploaded\n"
    )
    assert snapshot(client) == before
    # Without --check the publisher leaves values to agents' policies.
    code, out, err = run("publish", "m", str(path), "--json")
    assert code == 0 and json.loads(out)["version"] == 2
