"""The sentinels' users of docs/reliability.md ("Under Sentinel"), applied for real.

The block's lines go verbatim into three sentinels' configuration files (one
deployment for the module); hotswap logs in to them as the block's user with
``HOTSWAP_SENTINEL_USERNAME``/``HOTSWAP_SENTINEL_PASSWORD``. The sentinels'
``ACL LOG`` must stay empty through a publish and a replica read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from sentinel_support import SERVICE, SentinelSet
from waiting import poll

from hotswap import keys
from hotswap.errors import ConfigError
from hotswap.sentinel import replica_client
from hotswap.settings import HotswapSettings
from publisher import Publisher

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
USER = "hotswap-sentinel"
MODEL = "acl-sentinel"


def block() -> list[str]:
    """The one fenced block of docs/reliability.md that makes the sentinels' user."""
    found = [
        body.strip().splitlines()
        for body in re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.S)
        if f"user {USER} " in body
    ]
    assert len(found) == 1, f"{DOC} must hold one block making the user {USER}"
    return found[0]


def password() -> str:
    (line,) = [line for line in block() if line.startswith(f"user {USER} ")]
    return next(word[1:] for word in line.split() if word.startswith(">"))


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    with SentinelSet(sentinel_lines=block()) as deployment:
        yield deployment


def settings_for(deployment: SentinelSet, **more: object) -> HotswapSettings:
    more.setdefault("redis_url", deployment.url())
    return HotswapSettings(
        chunk_bytes=64 * 1024,
        retry_attempts=3,
        retry_max_wait=0.2,
        socket_timeout=2.0,
        connect_timeout=1.0,
        _env_file=None,  # type: ignore[call-arg]
        **more,
    )


def acl_logs(deployment: SentinelSet) -> list[object]:
    entries: list[object] = []
    for s in deployment.sentinels:
        with s.admin() as admin:
            entries += admin.execute_command("ACL", "LOG")
    return entries


def test_the_documented_user_publishes_and_reads_replicas(sentinel_set: SentinelSet) -> None:
    as_user = settings_for(sentinel_set, sentinel_username=USER, sentinel_password=password())
    for s in sentinel_set.sentinels:
        with s.admin() as admin:
            admin.execute_command("ACL", "LOG", "RESET")
    with Publisher(MODEL, settings=as_user) as pub:
        assert pub.publish({"w": torch.arange(6.0)}) == 1
        head = keys.head_key(pub.store.ns, MODEL)
    reader = replica_client(as_user)
    try:
        assert reader.execute_command("ROLE")[0] == b"slave"
        assert poll(lambda: reader.get(head) is not None, attempts=250), "replica never had head"
    finally:
        reader.close()
    assert acl_logs(sentinel_set) == []
    # The user may ask who the primary is, and nothing else.
    with redis.Redis(port=sentinel_set.sentinels[0].port, username=USER, password=password()) as c:
        for command in (
            ("SENTINEL", "FAILOVER", SERVICE),
            ("SENTINEL", "SET", SERVICE, "quorum", "1"),
            ("SENTINEL", "RESET", "*"),
            ("SENTINEL", "MONITOR", "other", "127.0.0.1", "1", "1"),
            ("SENTINEL", "CONFIG", "GET", "*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*command)


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"sentinel_username": USER, "sentinel_password": "not-it-9"}, id="wrong"),
        pytest.param({}, id="none"),  # the default user: it needs requirepass's password
    ],
)
def test_refused_credentials_are_a_config_error_and_change_nothing(
    sentinel_set: SentinelSet, credentials: dict[str, str]
) -> None:
    good = settings_for(sentinel_set, sentinel_username=USER, sentinel_password=password())
    with Publisher(MODEL, settings=good) as pub:
        before = pub.store.head()
    with (
        pytest.raises(ConfigError) as e,
        Publisher(MODEL, settings=settings_for(sentinel_set, **credentials)) as pub,
    ):
        pub.publish({"w": torch.arange(6.0) + 1})
    message = str(e.value)
    assert message.startswith(
        "Redis Sentinel could not name the primary while reading head for model "
        "'acl-sentinel': every sentinel refused to name the primary of 'hotswap-primary': "
        "check HOTSWAP_SENTINEL_USERNAME, HOTSWAP_SENTINEL_PASSWORD and the sentinels' "
        f"users (127.0.0.1:{sentinel_set.sentinels[0].port} refused: "
    ), message
    assert "not-it-9" not in message
    with Publisher(MODEL, settings=good) as pub:
        assert pub.store.head() == before


def test_a_service_no_sentinel_watches_is_a_config_error(sentinel_set: SentinelSet) -> None:
    wrong = settings_for(
        sentinel_set,
        redis_url=f"redis+sentinel://{sentinel_set.addresses()}/no-such-primary",
        sentinel_username=USER,
        sentinel_password=password(),
    )
    with pytest.raises(ConfigError) as e, Publisher(MODEL, settings=wrong) as pub:
        pub.publish({"w": torch.arange(6.0) + 2})
    first = sentinel_set.sentinels[0].port
    assert str(e.value).startswith(
        "Redis Sentinel could not name the primary while reading head for model "
        "'acl-sentinel': no sentinel watches a primary named 'no-such-primary': check "
        f"HOTSWAP_SENTINEL_MASTER or the URL's /NAME (127.0.0.1:{first}: no such service; "
    ), str(e.value)
