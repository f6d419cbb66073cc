"""Several seed addresses in HOTSWAP_REDIS_URL (issue 16, defect 2): parsing and refusals."""

from __future__ import annotations

import pytest

from hotswap.connection import connect
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import ConfigError
from hotswap.seeds import parse, shown, split
from hotswap.settings import HotswapSettings


def settings(url: str, cluster: bool = True) -> HotswapSettings:
    return HotswapSettings(redis_url=url, cluster=cluster, _env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("url", "first", "others"),
    [
        ("redis://a:7000", "redis://a:7000", ()),
        ("redis://a:7000,redis://b:7001", "redis://a:7000", (("b", 7001),)),
        ("redis://a:7000, b:7001 ,c:7002", "redis://a:7000", (("b", 7001), ("c", 7002))),
        ("rediss://u:pw@a:7000/0,rediss://b:7001/", "rediss://u:pw@a:7000/0", (("b", 7001),)),
        ("redis://u:pw@a:7000,redis://u:pw@b:7001", "redis://u:pw@a:7000", (("b", 7001),)),
        ("redis://a:7000,[::1]:7001", "redis://a:7000", (("::1", 7001),)),
        ("redis://a:7000,redis://b", "redis://a:7000", (("b", 6379),)),
        # A comma inside a password splits nothing: no address follows it.
        ("redis://u:p,w@a:7000,b:7001", "redis://u:p,w@a:7000", (("b", 7001),)),
    ],
)
def test_seed_lists_parse(url: str, first: str, others: tuple[tuple[str, int], ...]) -> None:
    seeds = parse(url)
    assert (seeds.first, seeds.others) == (first, others)


def test_passwords_are_masked_in_every_entry() -> None:
    url = "redis://app:s3cret@a:7000,redis://app:s3cret@b:7001"
    assert shown(url) == "redis://app:***@a:7000,redis://app:***@b:7001"
    assert parse(url).shown() == "redis://app:***@a:7000,b:7001"
    assert split("redis://a:1 , b:2") == ["redis://a:1", "b:2"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis://a:7000,rediss://b:7001",
            "HOTSWAP_REDIS_URL entry 'rediss://b:7001' must be host:port or a redis:// URL "
            "like the first (e.g. redis://host:7000,host2:7001)",
        ),
        (
            "redis://app:pw@a:7000,redis://other:s3cret@b:7001",
            "HOTSWAP_REDIS_URL entry 'redis://other:***@b:7001' names other credentials "
            "than the first: every node is reached with the first URL's; leave them out",
        ),
    ],
)
def test_bad_entries_are_refused_before_any_connection(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        connect(settings(url))
    assert str(e.value) == message
    assert "s3cret" not in str(e.value)


def test_several_addresses_need_a_cluster(server: EmbeddedRedis) -> None:
    url = f"{server.url},127.0.0.1:1"
    with pytest.raises(ConfigError) as e:
        connect(settings(url, cluster=False))
    assert str(e.value) == (
        f"HOTSWAP_REDIS_URL '{server.url},127.0.0.1:1' names 2 addresses, which only a "
        "Redis Cluster takes: set HOTSWAP_CLUSTER=true, or name one server"
    )
