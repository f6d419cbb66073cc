"""The publisher's commit under lost state and hostile input (issue 13).

Numbering heals itself when ``seq`` is lost; a full publish that omits
tensors is refused unless named; Redis out of memory is its own error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from acl_support import PUBLISHER, apply_documented, user_url
from pydantic import SecretStr
from rel_support import MODEL, make_state, nudged, settings_for
from safetensors.torch import save_file

from hotswap import keys
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import SourceError, StoreFull, StoreUnavailable
from hotswap.settings import HotswapSettings
from publisher import cli
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

SEQ = keys.seq_key("hotswap", MODEL)
HEAD = keys.head_key("hotswap", MODEL)


def publish_five(pub: Publisher) -> dict[str, torch.Tensor]:
    """v1..v5 published; returns a sixth, different state."""
    state = make_state(1)
    for i in range(5):
        assert pub.publish(nudged(state, 0.01 * i)) == i + 1
    return nudged(state, 0.5)


@pytest.mark.parametrize("lost", ["deleted", "lower than head"])
def test_a_lost_seq_costs_no_failed_publish(
    settings: HotswapSettings, client: redis.Redis, lost: str
) -> None:
    with Publisher(MODEL, settings=settings, connection=client) as pub:
        nxt = publish_five(pub)
        if lost == "deleted":
            client.delete(SEQ)
        else:
            client.set(SEQ, 2)
        assert pub.publish(nxt) == 6  # at the first try
        assert client.get(HEAD) == b"6" and client.get(SEQ) == b"6"
        assert pub.publish(nudged(nxt, 0.1)) == 7


@pytest.fixture
def full_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server that refuses writes once over maxmemory (noeviction)."""
    with EmbeddedRedis(extra_args=["--maxmemory-policy", "noeviction"]) as server:
        yield server


def test_redis_out_of_memory_is_store_full_exit_1_and_head_stays(
    full_server: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    admin = redis.Redis.from_url(full_server.url, socket_timeout=5)
    settings = settings_for(full_server)
    first = make_state(1)
    with Publisher(MODEL, settings=settings) as pub:
        assert pub.publish(first) == 1
        # Room for a few more keys, not for a whole new version.
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + 16 * 1024)
        big = make_state(2, width=256)
        with pytest.raises(StoreFull) as e:
            pub.publish(big, force=True)  # other shapes than head's: past the publisher's check
    assert str(e.value).startswith("Redis is out of memory (maxmemory reached) while ")
    assert "free memory (hotswap gc) or raise maxmemory" in str(e.value)
    assert not isinstance(e.value, StoreUnavailable)
    assert admin.get(keys.head_key("hotswap", MODEL)) == b"1"
    # The command line: one line, exit 1 (not 3, "unreachable").
    save_file(big, str(tmp_path / "big.safetensors"))
    monkeypatch.setenv("HOTSWAP_REDIS_URL", full_server.url)
    monkeypatch.setenv("HOTSWAP_RETRY_ATTEMPTS", "2")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["publish", MODEL, str(tmp_path / "big.safetensors"), "--force"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("hotswap: error: Redis is out of memory (maxmemory reached) while ")
    assert err.count("\n") == 1
    assert admin.get(keys.head_key("hotswap", MODEL)) == b"1"
    admin.close()


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key's serialized value: equal snapshots mean nothing was written."""
    return {k: client.dump(k) for k in sorted(client.scan_iter(count=1000))}


def test_a_full_publish_that_omits_tensors_is_refused_unless_excluded(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    first = make_state(1)
    with Publisher(MODEL, settings=settings, connection=client) as pub:
        assert pub.publish(first) == 1
        lacking = {k: v for k, v in nudged(first, 0.1).items() if not k.startswith("layer03")}
        lacking.pop("layer05.weight")
        before = snapshot(client)
        with pytest.raises(SourceError) as e:
            pub.publish(lacking)
        assert str(e.value) == (
            "state dict: a full publish lacks 2 tensors of head v1 "
            "('layer03.weight', 'layer05.weight'); add them, or name them with "
            "exclude=[GLOB] (--exclude GLOB) to drop them from the new version, "
            "or publish a subset with only=[GLOB] (--only GLOB)"
        )
        assert snapshot(client) == before  # no blob, no index entry, head still v1
        with pytest.raises(SourceError, match=r"lacks 1 tensor of head v1 \('layer05.weight'\)"):
            pub.publish(lacking, exclude=["layer03.*"])
        assert snapshot(client) == before
        assert pub.publish(lacking, exclude=["layer03.*", "layer05.weight"]) == 2
        names = [t.name for t in pub.store.manifest(2).tensors]
        assert names == ["layer00.weight", "layer01.weight", "layer02.weight", "layer04.weight"]
        # Excluded means left out of the version even where the source holds it.
        # layer05 comes back, a name head v2 lacks: forced past the publisher's check.
        assert pub.publish(nudged(first, 0.2), exclude=["layer0[0-3].*"], force=True) == 3
        assert [t.name for t in pub.store.manifest(3).tensors] == [
            "layer04.weight",
            "layer05.weight",
        ]


def test_signed_commits_and_resign_run_under_the_documented_publisher_user() -> None:
    # The commit script now writes (or deletes) the signed head record and the
    # reservation is a script: the documented publisher user must allow both.
    with EmbeddedRedis() as server:
        admin = apply_documented(server)
        url = user_url(server, PUBLISHER)
        signed = settings_for(url, signing_keys=[SecretStr("k" * 32)], head_expiry_seconds=60)
        with Publisher(MODEL, settings=signed) as pub:
            first = make_state(1)
            pub.publish(first)
            pub.publish(nudged(first, 0.01))
            assert pub.rollback() == 3
            assert pub.resign().version == 3
        admin.delete(keys.seq_key("hotswap", MODEL))
        with Publisher(MODEL, settings=settings_for(url)) as pub:
            assert pub.publish(nudged(first, 0.02)) == 4  # unsigned: deletes the record
        assert admin.get(keys.head_record_key("hotswap", MODEL)) is None
        assert admin.execute_command("ACL", "LOG") == []
        admin.close()
