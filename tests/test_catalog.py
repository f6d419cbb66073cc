"""hotswap.catalog: which models a namespace holds, what one holds, deleting one."""

from __future__ import annotations

import pytest
import redis
import torch

from hotswap import catalog, keys
from hotswap import status as st
from hotswap.connection import operation_retry
from hotswap.errors import NotFound
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher


def publish(
    settings: HotswapSettings, client: redis.Redis, model: str, ns: str = "hotswap"
) -> None:
    s = settings.model_copy(update={"namespace": ns})
    with Publisher(model, settings=s, connection=client) as p:
        p.publish({"w": torch.arange(1000, dtype=torch.float32) + len(model)})


@pytest.mark.parametrize(
    ("key", "model"),
    [
        ("hotswap:{minilm}:head", "minilm"),
        ("hotswap:{m.v2_x-y}:seq", "m.v2_x-y"),
        ("hotswap:{m}:log", "m"),
        ("hotswap:{m}:status:head", None),  # an agent whose id is "head"
        ("hotswap:{m}:manifest:1", None),
        ("other:{m}:head", None),
        ("hotswap:m:blob:head", None),
        ("hotswap:{bad name}:head", None),
    ],
)
def test_the_model_a_marker_key_names(key: str, model: str | None) -> None:
    assert keys.model_of_marker_key("hotswap", key) == model


def test_models_of_one_namespace_only(settings: HotswapSettings, client: redis.Redis) -> None:
    publish(settings, client, "b")
    publish(settings, client, "a")
    publish(settings, client, "c", ns="elsewhere")
    # An agent that reports for a model nobody published makes no model.
    ghost = Store(client, "ghost")
    ghost.write_agent_status("x", st.encode(st.AgentStatus("x", "h", 1)), ttl=60)
    assert catalog.model_names(client, "hotswap", operation_retry(2, 0.1)) == ["a", "b"]
    assert catalog.model_names(client, "elsewhere", operation_retry(2, 0.1)) == ["c"]
    assert not catalog.exists(ghost)
    # A first publish that reserved a number and failed: the model exists, has no versions.
    counter_only = Store(client, "half")
    counter_only.reserve_version()
    assert catalog.exists(counter_only) and counter_only.head() is None


def test_require_names_the_closest_models(settings: HotswapSettings, client: redis.Redis) -> None:
    for name in ("minilm", "mpnet", "bert-base"):
        publish(settings, client, name)
    with pytest.raises(NotFound) as e:
        catalog.require(Store(client, "minlm"))
    assert str(e.value) == (
        "model 'minlm' is not in Redis (namespace 'hotswap'); did you mean 'minilm'?; "
        "`hotswap models` lists the models there"
    )
    with pytest.raises(NotFound) as e:
        catalog.require(Store(client, "zzz"))
    assert "did you mean" not in str(e.value)
    catalog.require(Store(client, "mpnet"))


def test_footprint_and_delete_touch_one_model(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    publish(settings, client, "m")
    publish(settings, client, "m2")  # "m" is a prefix of its name: its keys are not m's
    store = Store(client, "m")
    used = catalog.footprint(store)
    chunks = list(client.scan_iter(match=b"hotswap:m:blob:*"))
    assert used.chunks == len(chunks) and used.blob_bytes == 4000
    others = {k: client.dump(k) for k in client.scan_iter() if b"m2" in k}
    deleted = catalog.delete_model(store)
    assert deleted == used.chunks + used.other_keys
    assert sorted(client.scan_iter()) == sorted(others)
    assert {k: client.dump(k) for k in client.scan_iter()} == others
    assert not catalog.exists(store) and catalog.exists(Store(client, "m2"))
