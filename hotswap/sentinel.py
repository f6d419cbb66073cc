"""Redis Sentinel: clients of the primary the sentinels name now, and of its replicas.

For primary/replica deployments that are not clusters. The deployment is
named by ``HOTSWAP_SENTINELS`` and ``HOTSWAP_SENTINEL_MASTER``, or by a
``redis+sentinel://`` ``HOTSWAP_REDIS_URL`` (``hotswap.seeds``);
``deployment`` reads either and refuses what cannot work together. The
clients are redis-py's ``Sentinel.master_for`` and ``slave_for``: each new
connection asks the sentinels, first that answers, where to go, so losing
one sentinel loses nothing and a connection opened after a failover reaches
the new primary. Connections already open follow too: ``PrimaryPool`` asks
again, at most every ``RECHECK`` seconds, whether the primary moved, because
after a ``SENTINEL FAILOVER`` the old primary stays writable for seconds
(until the sentinels turn it into a replica) and redis-py would go on
writing to it.

Only entry points build clients (``hotswap.connection.connect`` calls
``primary_client``); ``replica_client`` is for readers that may be behind.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from hotswap.errors import ConfigError
from hotswap.redact import scrub
from hotswap.seeds import is_sentinel_url, parse_addresses, parse_sentinel_url, split
from hotswap.seeds import shown as shown_url
from hotswap.settings import HotswapSettings

# Longest an open connection may go on talking to a node the sentinels no
# longer name as the primary. Each check is one SENTINEL MASTERS, asked only
# when a connection is handed out, so an idle process asks nothing.
RECHECK = 1.0
# After a re-check that reached no sentinel at all: each one costs up to the
# connect timeout per sentinel, paid by a command, so not every second.
RECHECK_UNREACHABLE = 30.0
_TLS_SCHEME = "rediss+sentinel://"


@dataclass(frozen=True)
class Deployment:
    """A Sentinel deployment: where the sentinels are, the service they watch, and
    the data nodes' database and credentials."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def configured(settings: HotswapSettings) -> bool:
    """Whether ``settings`` name a Sentinel deployment (checked or not)."""
    return bool(settings.sentinels and settings.sentinels.strip()) or _by_url(settings.redis_url)


def _by_url(url: str) -> bool:
    return is_sentinel_url(url) or url.strip().lower().startswith(_TLS_SCHEME)


def deployment(settings: HotswapSettings) -> Deployment | None:
    """The Sentinel deployment ``settings`` name, or None for a single node or a cluster.

    Raises:
        ConfigError: the sentinel settings contradict each other or the rest
            (Sentinel with ``HOTSWAP_CLUSTER``, no service name, sentinels named
            twice, a sentinel setting without sentinels, TLS), or an address
            or URL is malformed.

    Example:
        >>> deployment(HotswapSettings(redis_url="redis+sentinel://s1:26379,s2/cache"))
        Deployment(sentinels=(('s1', 26379), ('s2', 26379)), service='cache', db=0, username=None)
    """
    if not configured(settings):
        _refuse_orphans(settings)
        return None
    url = settings.redis_url.strip()
    if settings.cluster:
        raise ConfigError(
            "HOTSWAP_CLUSTER=true and Sentinel settings exclude each other (a Redis Cluster "
            "fails over by itself): unset HOTSWAP_CLUSTER for a Sentinel deployment, or the "
            "sentinel settings for a cluster"
        )
    if url.lower().startswith(("rediss://", _TLS_SCHEME)):
        raise ConfigError(
            "TLS to a Sentinel deployment is not supported yet: use redis+sentinel:// "
            "(or a redis:// HOTSWAP_REDIS_URL with HOTSWAP_SENTINELS) inside a trusted network"
        )
    if is_sentinel_url(url):
        if settings.sentinels and settings.sentinels.strip():
            raise ConfigError(
                f"HOTSWAP_SENTINELS and HOTSWAP_REDIS_URL {shown_url(url)!r} both name "
                "sentinels: name them once (unset one of the two)"
            )
        parsed = parse_sentinel_url(url)
        named = settings.sentinel_master
        if named and parsed.service and named != parsed.service:
            raise ConfigError(
                f"HOTSWAP_SENTINEL_MASTER={named!r} but HOTSWAP_REDIS_URL names the service "
                f"{parsed.service!r}: name it once"
            )
        service = _service(parsed.service or named)
        return Deployment(parsed.sentinels, service, parsed.db, parsed.username, parsed.password)
    sentinels = parse_addresses(settings.sentinels or "", "HOTSWAP_SENTINELS")
    db, username, password = _data_nodes(url)
    return Deployment(sentinels, _service(settings.sentinel_master), db, username, password)


def _refuse_orphans(settings: HotswapSettings) -> None:
    """A sentinel setting without sentinels is a deployment half configured."""
    for name in ("sentinel_master", "sentinel_username", "sentinel_password"):
        if getattr(settings, name) is not None:
            variable = f"HOTSWAP_{name.upper()}"
            raise ConfigError(
                f"{variable} is set but no sentinel is named: set HOTSWAP_SENTINELS="
                "host:port,host:port (or a redis+sentinel:// HOTSWAP_REDIS_URL), "
                f"or unset {variable}"
            )


def _service(name: str | None) -> str:
    if not name or not name.strip():
        raise ConfigError(
            "no Sentinel service name: set HOTSWAP_SENTINEL_MASTER=NAME, or end the "
            "redis+sentinel:// URL with /NAME (the NAME of `sentinel monitor NAME ...` "
            "in the sentinels' configuration)"
        )
    return name.strip()


def _data_nodes(url: str) -> tuple[int, str | None, str | None]:
    """The db and credentials a ``redis://`` URL gives the data nodes (its address
    is not used: the sentinels name the primary)."""
    if not url.startswith("redis://") or len(split(url)) > 1:
        raise ConfigError(
            f"with HOTSWAP_SENTINELS, HOTSWAP_REDIS_URL {shown_url(url)!r} must be one "
            "redis:// URL: it gives the data nodes' user:password@ and /db (its host is "
            "not used)"
        )
    try:
        parts = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise ConfigError(
            f"invalid HOTSWAP_REDIS_URL {shown_url(url)!r}: {scrub(str(e), url)}"
        ) from e
    username, password = parts.get("username"), parts.get("password")
    return (
        int(parts.get("db", 0)),
        unquote(username) if username else None,
        unquote(password) if password else None,
    )


class SentinelSetupError(redis.ConnectionError):
    """The sentinels answered, and what they said needs a setting fixed, not time:
    every one refused the credentials or the command, or none watches the service.
    Never retried (``connection.PERMANENT``); ``guarded`` raises ``ConfigError``."""


class SentinelsUnreachable(MasterNotFoundError):
    """No sentinel answered at all (each refused the connection or timed out)."""


class _Sentinels(Sentinel):
    """redis-py's ``Sentinel`` whose lookup of the primary says why it found none,
    in one short line per sentinel, and tells a setting to fix from an outage."""

    def discover_master(self, service_name: str) -> Any:
        refused: list[str] = []
        other: list[str] = []
        unknown = answered = 0
        for i, sentinel in enumerate(self.sentinels):
            where = "{host}:{port}".format_map(sentinel.connection_pool.connection_kwargs)
            try:
                masters: Any = sentinel.sentinel_masters()
            except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:
                refused.append(f"{where} refused: {e}")
                continue
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                other.append(f"{where}: {type(e).__name__}: {e}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                # The one that answered is asked first next time (as redis-py does).
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
            answered += 1
            unknown += state is None
            other.append(f"{where}: " + ("no such service" if state is None else "primary down"))
        found = "; ".join(refused + other)
        if len(refused) == len(self.sentinels):
            raise SentinelSetupError(
                f"every sentinel refused to name the primary of {service_name!r}: check "
                f"HOTSWAP_SENTINEL_USERNAME, HOTSWAP_SENTINEL_PASSWORD and the sentinels' "
                f"users ({found})"
            )
        if unknown and len(refused) + unknown == len(self.sentinels):
            raise SentinelSetupError(
                f"no sentinel watches a primary named {service_name!r}: check "
                f"HOTSWAP_SENTINEL_MASTER or the URL's /NAME ({found})"
            )
        if not answered and not refused:
            raise SentinelsUnreachable(f"no sentinel answered ({found})")
        raise MasterNotFoundError(f"no sentinel names a live primary of {service_name!r} ({found})")


class SentinelRedis(redis.Redis):
    """A client whose connections go where the sentinels say; ``close`` also
    closes its connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            manager, self.sentinel_manager = self.sentinel_manager, None
            if manager is not None:
                for client in manager.sentinels:
                    with contextlib.suppress(redis.RedisError, OSError):
                        client.close()


class PrimaryPool(SentinelConnectionPool):
    """redis-py's pool of primary connections, which also drops an open connection to
    a node the sentinels stopped naming (checked at most every ``RECHECK`` seconds)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._recheck_at = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection: Any = super().get_connection(*args, **kwargs)
        try:
            if self._moved(connection):
                connection.disconnect()
                connection.connect()  # asks the sentinels again
        except BaseException:
            self.release(connection)
            raise
        return connection

    def _moved(self, connection: Any) -> bool:
        now = time.monotonic()
        if now < self._recheck_at:
            return False
        self._recheck_at = now + RECHECK
        try:
            # Also drops the idle connections to a primary that moved.
            address = self.get_master_address()  # type: ignore[no-untyped-call]
        except SentinelsUnreachable:
            self._recheck_at = time.monotonic() + RECHECK_UNREACHABLE
            return False
        except redis.RedisError:
            # No sentinel answered, or none names a healthy primary: the open
            # connection is the best guess left, and its command fails by itself
            # if that node is gone.
            return False
        return (connection.host, connection.port) != tuple(address)


def _socket_options(settings: HotswapSettings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_keepalive": True,
        # Retries belong to hotswap's tenacity policy alone, as in connect().
        "retry": Retry(NoBackoff(), 0),
    }


def _manager(settings: HotswapSettings, where: Deployment) -> Sentinel:
    # A sentinel answers a lookup at once: one that hangs is passed over after
    # the connect timeout, not after a whole command's.
    to_sentinels = {
        **_socket_options(settings),
        "socket_timeout": settings.connect_timeout,
    }
    if settings.sentinel_username:
        to_sentinels["username"] = settings.sentinel_username
    if settings.sentinel_password is not None:
        to_sentinels["password"] = settings.sentinel_password.get_secret_value()
    to_nodes = {**_socket_options(settings), "db": where.db}
    if where.username:
        to_nodes["username"] = where.username
    if where.password:
        to_nodes["password"] = where.password
    return _Sentinels(where.sentinels, sentinel_kwargs=to_sentinels, **to_nodes)


def _client(manager: Sentinel, client: Any) -> SentinelRedis:
    assert isinstance(client, SentinelRedis)
    client.sentinel_manager = manager
    return client


def primary_client(settings: HotswapSettings, where: Deployment) -> SentinelRedis:
    """A client of the primary of ``where`` (redis-py ``master_for``), following failovers.

    ``hotswap.connection.connect`` returns it for Sentinel settings; use that.
    """
    manager = _manager(settings, where)
    return _client(
        manager,
        manager.master_for(
            where.service, redis_class=SentinelRedis, connection_pool_class=PrimaryPool
        ),
    )


def replica_client(settings: HotswapSettings) -> SentinelRedis:
    """A client that reads from a replica of the Sentinel deployment ``settings`` name.

    redis-py's ``slave_for``: each connection goes to the next live replica the
    sentinels list (round robin), or to the primary when none is left. A
    replica may be behind the primary (never wrong for content-addressed
    blobs, possibly missing one just written): read metadata from the primary
    (``connect``), and fall back to it for a key the replica lacks. Its
    commands raise redis-py's errors; run them under ``connection.guarded``.
    Close it when done (it also closes its connections to the sentinels).

    Args:
        settings: settings naming a Sentinel deployment (``HOTSWAP_SENTINELS``
            and ``HOTSWAP_SENTINEL_MASTER``, or a ``redis+sentinel://`` URL).

    Returns:
        A ``redis.Redis`` whose connections go to replicas.

    Raises:
        ConfigError: ``settings`` name no Sentinel deployment, or a bad one.

    Example::

        reader = replica_client(HotswapSettings(redis_url="redis+sentinel://s1:26379,s2:26379/cache"))
        try:
            chunk = reader.get(key)  # None: not there yet, read the primary
        finally:
            reader.close()
    """
    where = deployment(settings)
    if where is None:
        raise ConfigError(
            "replica reads need a Sentinel deployment: set HOTSWAP_SENTINELS and "
            "HOTSWAP_SENTINEL_MASTER, or a redis+sentinel:// HOTSWAP_REDIS_URL"
        )
    manager = _manager(settings, where)
    return _client(manager, manager.slave_for(where.service, redis_class=SentinelRedis))
