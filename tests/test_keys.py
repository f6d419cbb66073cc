"""Key layout: one Cluster slot for a model's metadata, blobs spread, names checked."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from hotswap import keys
from hotswap.errors import ConfigError

DIGEST = "ab" * 32


def metadata_keys(ns: str, model: str) -> list[str]:
    return [
        keys.seq_key(ns, model),
        keys.head_key(ns, model),
        keys.head_record_key(ns, model),
        keys.manifest_key(ns, model, 1),
        keys.manifest_key(ns, model, 987654),
        keys.log_key(ns, model),
        keys.agents_key(ns, model),
        keys.heartbeat_key(ns, model, "host-1.4242"),
        keys.events_channel(ns, model),
        keys.blob_index_key(ns, model),
    ]


def test_layout_matches_the_design() -> None:
    assert keys.seq_key("hotswap", "m") == "hotswap:{m}:seq"
    assert keys.head_key("hotswap", "m") == "hotswap:{m}:head"
    assert keys.head_record_key("hotswap", "m") == "hotswap:{m}:head:signed"
    assert keys.manifest_key("hotswap", "m", 7) == "hotswap:{m}:manifest:7"
    assert keys.manifest_pattern("hotswap", "m") == "hotswap:{m}:manifest:*"
    assert keys.log_key("ns", "m") == "ns:{m}:log"
    assert keys.agents_key("ns", "m") == "ns:{m}:agents"
    assert keys.heartbeat_key("ns", "m", "a1") == "ns:{m}:agent:a1"
    assert keys.events_channel("ns", "m") == "ns:{m}:events"
    assert keys.blob_index_key("ns", "m") == "ns:{m}:blobs"
    assert keys.blob_prefix("ns", "m") == "ns:m:blob:"
    assert keys.blob_key("ns", "m", DIGEST, 65536, 2) == f"ns:m:blob:{DIGEST}:65536:2"
    assert keys.namespace_pattern("ns", "m") == ["ns:{m}:*", "ns:m:blob:*"]


@pytest.mark.parametrize("model", ["m", "bert-base.v2", "A_b", "x" * 128])
def test_metadata_shares_one_cluster_slot(model: str) -> None:
    slots = {key_slot(k.encode()) for k in metadata_keys("hotswap", model)}
    assert slots == {key_slot(model.encode())}


def test_blob_keys_spread_over_slots() -> None:
    blob_keys = [
        keys.blob_key("hotswap", "m", f"{i:064x}", 4 * 1024 * 1024, j)
        for i in range(8)
        for j in range(8)
    ]
    slots = {key_slot(k.encode()) for k in blob_keys}
    assert len(slots) > 32
    assert all("{" not in k for k in blob_keys)


def test_models_do_not_share_keys() -> None:
    a, b = set(metadata_keys("ns", "a")), set(metadata_keys("ns", "b"))
    assert not a & b
    assert not set(metadata_keys("ns1", "a")) & set(metadata_keys("ns2", "a"))


def test_manifest_version_round_trip() -> None:
    assert keys.version_from_manifest_key(keys.manifest_key("ns", "m.v1", 42)) == 42


def test_blob_ids_name_every_chunk() -> None:
    blob = keys.blob_id(DIGEST, 1024, 3)
    assert blob == f"{DIGEST}:1024:3"
    assert keys.blob_keys_of_id("ns", "m", blob) == [
        keys.blob_key("ns", "m", DIGEST, 1024, i) for i in range(3)
    ]


@pytest.mark.parametrize(
    "name", ["", "a b", "x" * 129, "a/b", "a:b", "{m}", "a*", "é", "m\n", None, 7]
)
def test_invalid_model_names_are_refused(name: object) -> None:
    with pytest.raises(ConfigError) as e:
        keys.head_key("hotswap", name)  # type: ignore[arg-type]
    assert str(e.value) == (
        f"invalid model name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -"
    )


@pytest.mark.parametrize("ns", ["", "a b", "ns:x", "x" * 129])
def test_invalid_namespaces_are_refused(ns: str) -> None:
    with pytest.raises(ConfigError) as e:
        keys.manifest_key(ns, "m", 1)
    assert str(e.value) == f"invalid namespace {ns!r}: use 1-128 characters from A-Z a-z 0-9 . _ -"
    with pytest.raises(ConfigError, match="invalid namespace"):
        keys.blob_key(ns, "m", DIGEST, 1, 0)


def test_invalid_agent_id_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^invalid agent id 'a b': use 1-128"):
        keys.heartbeat_key("ns", "m", "a b")


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "../x", "g" * 64])
def test_invalid_digest_is_refused(digest: str) -> None:
    with pytest.raises(ConfigError) as e:
        keys.blob_key("ns", "m", digest, 1024, 0)
    assert str(e.value) == f"invalid digest {digest!r}: expected 64 lowercase hex characters"


def test_check_name_returns_the_name() -> None:
    assert keys.check_name("Model-1.2_x") == "Model-1.2_x"
