"""Sentinel settings (issue 16): the redis+sentinel:// URL, HOTSWAP_SENTINELS, and
every combination that cannot work refused before a connection is made.

Pure: no server. The deployment itself (failover, a lost sentinel, ACL users)
is tested on real processes in tests/ha/test_failover_sentinel.py and
tests/ha/test_sentinel_acl.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import redis
from pydantic import SecretStr

from hotswap import sentinel
from hotswap.connection import connect, operation_retry
from hotswap.embedded import free_port
from hotswap.errors import ConfigError, StoreUnavailable
from hotswap.seeds import parse_addresses, parse_sentinel_url, shown
from hotswap.sentinel import (
    RECHECK_UNREACHABLE,
    Deployment,
    PrimaryPool,
    SentinelRedis,
    SentinelsUnreachable,
    deployment,
    replica_client,
)
from hotswap.settings import HotswapSettings, load
from hotswap.store import Store


def settings(**values: object) -> HotswapSettings:
    return HotswapSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "db", "user", "password"),
    [
        ("redis+sentinel://s1:26379/cache", (("s1", 26379),), "cache", 0, None, None),
        (
            "redis+sentinel://s1:26380, s2 ,[::1]:26381/cache/3",
            (("s1", 26380), ("s2", 26379), ("::1", 26381)),
            "cache",
            3,
            None,
            None,
        ),
        ("redis+sentinel://app:p%40ss@s1/cache", (("s1", 26379),), "cache", 0, "app", "p@ss"),
        ("redis+sentinel://:pw@s1:1/", (("s1", 1),), None, 0, None, "pw"),
        ("REDIS+SENTINEL://s1:2", (("s1", 2),), None, 0, None, None),
    ],
)
def test_sentinel_urls_parse(
    url: str,
    sentinels: tuple[tuple[str, int], ...],
    service: str | None,
    db: int,
    user: str | None,
    password: str | None,
) -> None:
    parsed = parse_sentinel_url(url)
    assert (parsed.sentinels, parsed.service, parsed.db) == (sentinels, service, db)
    assert (parsed.username, parsed.password) == (user, password)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis+sentinel://s1:26379/cache?db=1",
            "HOTSWAP_REDIS_URL 'redis+sentinel://s1:26379/cache?db=1': a redis+sentinel:// "
            "URL takes no options; set them as HOTSWAP_* settings",
        ),
        (
            "redis+sentinel://s1:26379/cache/zero",
            "HOTSWAP_REDIS_URL 'redis+sentinel://s1:26379/cache/zero': the path must be "
            "/SERVICE or /SERVICE/DB (e.g. redis+sentinel://s1:26379,s2:26379/mymaster/0)",
        ),
        (
            "redis+sentinel://u:s3cret@s1:notaport/cache",
            "HOTSWAP_REDIS_URL 'redis+sentinel://u:***@s1:notaport/cache': entry "
            "'s1:notaport' must be host:port (e.g. sentinel-1:26379,sentinel-2:26379)",
        ),
        (
            "redis+sentinel://u:s3cret@/cache",
            "HOTSWAP_REDIS_URL 'redis+sentinel://u:***@/cache': names no sentinel: list "
            "them as host:port,host:port",
        ),
    ],
)
def test_bad_sentinel_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_sentinel_url(url)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as again:
        connect(settings(redis_url=url))
    assert str(again.value) == message
    assert "s3cret" not in message


def test_sentinel_lists() -> None:
    assert parse_addresses("a:1,b", "HOTSWAP_SENTINELS") == (("a", 1), ("b", 26379))
    with pytest.raises(ConfigError) as e:
        parse_addresses("a:1,b:99999", "HOTSWAP_SENTINELS")
    assert str(e.value) == (
        "HOTSWAP_SENTINELS entry 'b:99999' must be host:port "
        "(e.g. sentinel-1:26379,sentinel-2:26379)"
    )


def test_passwords_are_masked_in_sentinel_urls() -> None:
    assert shown("redis+sentinel://app:s3cret@s1:1,s2:2,s3:3/cache") == (
        "redis+sentinel://app:***@s1:1,s2:2,s3:3/cache"
    )


def test_the_url_form_names_a_deployment() -> None:
    found = deployment(
        settings(redis_url="redis+sentinel://app:pw@s1:1,s2:2/cache/2", sentinel_master="cache")
    )
    assert found == Deployment((("s1", 1), ("s2", 2)), "cache", 2, "app", "pw")
    assert "pw" not in repr(found)
    # The service may come from HOTSWAP_SENTINEL_MASTER when the URL leaves it out.
    by_setting = deployment(settings(redis_url="redis+sentinel://s1:1", sentinel_master="c"))
    assert by_setting == Deployment((("s1", 1),), "c")


def test_separate_settings_take_the_data_nodes_credentials_from_the_url() -> None:
    found = deployment(
        settings(
            redis_url="redis://app:p%2Fw@ignored-host:6379/4",
            sentinels="s1:26379, s2:26380",
            sentinel_master="cache",
        )
    )
    assert found == Deployment((("s1", 26379), ("s2", 26380)), "cache", 4, "app", "p/w")
    # Unset HOTSWAP_REDIS_URL: no credentials, db 0 (its default host is never used).
    plain = deployment(settings(sentinels="s1", sentinel_master="cache"))
    assert plain == Deployment((("s1", 26379),), "cache", 0, None, None)
    assert deployment(settings(redis_url="redis://h:1/0")) is None


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_SENTINELS", "s1:26379,s2:26379")
    monkeypatch.setenv("HOTSWAP_SENTINEL_MASTER", "cache")
    monkeypatch.setenv("HOTSWAP_SENTINEL_USERNAME", "hs")
    monkeypatch.setenv("HOTSWAP_SENTINEL_PASSWORD", "s3cret")
    s = load(_env_file=None)
    assert s.sentinel_password == SecretStr("s3cret")
    assert "s3cret" not in repr(s)
    assert deployment(s) == Deployment((("s1", 26379), ("s2", 26379)), "cache")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"redis_url": "redis+sentinel://s1:1/cache", "cluster": True},
            "HOTSWAP_CLUSTER=true and Sentinel settings exclude each other (a Redis Cluster "
            "fails over by itself): unset HOTSWAP_CLUSTER for a Sentinel deployment, or the "
            "sentinel settings for a cluster",
        ),
        (
            {"sentinels": "s1:1", "sentinel_master": "cache", "cluster": True},
            "HOTSWAP_CLUSTER=true and Sentinel settings exclude each other (a Redis Cluster "
            "fails over by itself): unset HOTSWAP_CLUSTER for a Sentinel deployment, or the "
            "sentinel settings for a cluster",
        ),
        (
            {"redis_url": "redis+sentinel://s1:1,s2:2"},
            "no Sentinel service name: set HOTSWAP_SENTINEL_MASTER=NAME, or end the "
            "redis+sentinel:// URL with /NAME (the NAME of `sentinel monitor NAME ...` "
            "in the sentinels' configuration)",
        ),
        (
            {"sentinels": "s1:1"},
            "no Sentinel service name: set HOTSWAP_SENTINEL_MASTER=NAME, or end the "
            "redis+sentinel:// URL with /NAME (the NAME of `sentinel monitor NAME ...` "
            "in the sentinels' configuration)",
        ),
        (
            {"sentinel_master": "cache"},
            "HOTSWAP_SENTINEL_MASTER is set but no sentinel is named: set HOTSWAP_SENTINELS="
            "host:port,host:port (or a redis+sentinel:// HOTSWAP_REDIS_URL), or unset "
            "HOTSWAP_SENTINEL_MASTER",
        ),
        (
            {"sentinel_password": "s3cret"},
            "HOTSWAP_SENTINEL_PASSWORD is set but no sentinel is named: set HOTSWAP_SENTINELS="
            "host:port,host:port (or a redis+sentinel:// HOTSWAP_REDIS_URL), or unset "
            "HOTSWAP_SENTINEL_PASSWORD",
        ),
        (
            {"redis_url": "redis+sentinel://s1:1/cache", "sentinels": "s2:2"},
            "HOTSWAP_SENTINELS and HOTSWAP_REDIS_URL 'redis+sentinel://s1:1/cache' both name "
            "sentinels: name them once (unset one of the two)",
        ),
        (
            {"redis_url": "redis+sentinel://s1:1/cache", "sentinel_master": "other"},
            "HOTSWAP_SENTINEL_MASTER='other' but HOTSWAP_REDIS_URL names the service "
            "'cache': name it once",
        ),
        (
            {"redis_url": "rediss+sentinel://s1:1/cache"},
            "TLS to a Sentinel deployment is not supported yet: use redis+sentinel:// "
            "(or a redis:// HOTSWAP_REDIS_URL with HOTSWAP_SENTINELS) inside a trusted network",
        ),
        (
            {"redis_url": "rediss://h:1/0", "sentinels": "s1", "sentinel_master": "c"},
            "TLS to a Sentinel deployment is not supported yet: use redis+sentinel:// "
            "(or a redis:// HOTSWAP_REDIS_URL with HOTSWAP_SENTINELS) inside a trusted network",
        ),
        (
            {"redis_url": "unix:///tmp/r.sock", "sentinels": "s1", "sentinel_master": "c"},
            "with HOTSWAP_SENTINELS, HOTSWAP_REDIS_URL 'unix:///tmp/r.sock' must be one "
            "redis:// URL: it gives the data nodes' user:password@ and /db (its host is "
            "not used)",
        ),
        (
            {"redis_url": "redis://u:s3cret@a:1,b:2", "sentinels": "s1", "sentinel_master": "c"},
            "with HOTSWAP_SENTINELS, HOTSWAP_REDIS_URL 'redis://u:***@a:1,b:2' must be one "
            "redis:// URL: it gives the data nodes' user:password@ and /db (its host is "
            "not used)",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(values: dict[str, object], message: str) -> None:
    s = settings(**values)
    before = s.model_dump()
    with pytest.raises(ConfigError) as e:
        connect(s)
    assert str(e.value) == message
    assert "s3cret" not in str(e.value)
    assert s.model_dump() == before


def test_connect_builds_a_primary_client_without_connecting() -> None:
    s = settings(
        redis_url="redis+sentinel://app:pw@127.0.0.1:1,127.0.0.1:2/cache/5",
        sentinel_username="hs",
        sentinel_password="spw",
        socket_timeout=3.0,
        connect_timeout=0.5,
    )
    client = connect(s)
    try:
        assert isinstance(client, SentinelRedis)
        pool = client.connection_pool
        assert isinstance(pool, PrimaryPool) and pool.service_name == "cache"
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (5, "app", "pw")
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3.0, 0.5)
        manager = client.sentinel_manager
        assert manager is not None and len(manager.sentinels) == 2
        to_sentinel = manager.sentinels[0].connection_pool.connection_kwargs
        assert (to_sentinel["username"], to_sentinel["password"]) == ("hs", "spw")
        # A hung sentinel is passed over after the connect timeout.
        assert to_sentinel["socket_timeout"] == 0.5
    finally:
        client.close()
    assert client.sentinel_manager is None


def test_replica_client_needs_a_sentinel_deployment() -> None:
    assert not sentinel.configured(settings(redis_url="redis://h:1/0"))
    with pytest.raises(ConfigError) as e:
        replica_client(settings(redis_url="redis://h:1/0"))
    assert str(e.value) == (
        "replica reads need a Sentinel deployment: set HOTSWAP_SENTINELS and "
        "HOTSWAP_SENTINEL_MASTER, or a redis+sentinel:// HOTSWAP_REDIS_URL"
    )
    reader = replica_client(settings(redis_url="redis+sentinel://127.0.0.1:1/cache"))
    try:
        assert reader.connection_pool.is_master is False
    finally:
        reader.close()


def test_no_sentinel_answering_is_an_outage_and_spaces_the_rechecks() -> None:
    """Nobody listens on these ports: the lookup fails as an outage (retried, then
    StoreUnavailable), and an open connection's re-check waits longer before the
    next try, since each costs its command up to a connect timeout per sentinel."""
    dead = [free_port(), free_port()]
    url = f"redis+sentinel://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/cache"
    client = connect(settings(redis_url=url, connect_timeout=0.2))
    try:
        with pytest.raises(SentinelsUnreachable) as e:
            client.ping()
        assert isinstance(e.value, redis.ConnectionError)
        assert str(e.value).startswith(f"no sentinel answered (127.0.0.1:{dead[0]}: ")
        with pytest.raises(StoreUnavailable) as unavailable:
            Store(client, "m", retrying=operation_retry(2, 0.01)).head()
        message = str(unavailable.value)
        assert message.startswith(
            "Redis unreachable while reading head for model 'm' (SentinelsUnreachable: "
        ), message
        assert message.endswith("; check the sentinels (HOTSWAP_SENTINELS) and the primary")
        pool = client.connection_pool
        assert isinstance(pool, PrimaryPool)
        before = time.monotonic()
        assert pool._moved(SimpleNamespace(host="127.0.0.1", port=dead[0])) is False
        assert pool._recheck_at >= before + RECHECK_UNREACHABLE
    finally:
        client.close()
