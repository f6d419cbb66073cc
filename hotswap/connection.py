"""Turning settings into a Redis client, and the one retry and error policy.

Only entry points (the CLI, ``Agent``/``Publisher`` given settings) call
``connect``; library code takes the client as an argument. ``guarded`` is the
policy every Redis operation of ``store`` and ``blobs`` runs under: retried
while the failure may heal, then mapped into the ``HotswapError`` tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.cluster
import redis.sentinel
import tenacity
from redis.backoff import NoBackoff
from redis.retry import Retry

from hotswap import sentinel
from hotswap.errors import ConfigError, HotswapError, StoreFull, StoreUnavailable
from hotswap.redact import (
    redact,  # noqa: F401 - re-exported for callers that mask a URL
    scrub,
)
from hotswap.seeds import Seeds
from hotswap.seeds import parse as parse_seeds
from hotswap.seeds import shown as shown_url
from hotswap.settings import HotswapSettings

T = TypeVar("T")
RedisClient = Any  # redis.Redis or redis.cluster.RedisCluster: same command API

# Errors worth another attempt: the server is away, restarting, or slow.
# AuthenticationError derives from ConnectionError but will not heal by waiting.
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    ConnectionResetError,
    # No cluster node answered (all away, or mid-failover): outside RedisError.
    *(
        (redis.exceptions.RedisClusterUnreachableError,)
        if hasattr(redis.exceptions, "RedisClusterUnreachableError")
        else ()
    ),
)
PERMANENT: tuple[type[BaseException], ...] = (
    redis.AuthenticationError,
    sentinel.SentinelSetupError,
)


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT) and not isinstance(error, PERMANENT)


def _out_of_memory(error: redis.RedisError) -> bool:
    # A write from inside a Lua script comes back as a plain script error
    # quoting Redis's OOM text, not as redis-py's OutOfMemoryError.
    return isinstance(error, redis.exceptions.OutOfMemoryError) or "> 'maxmemory'" in str(error)


def _backoff(first: float, max_wait: float) -> tenacity.wait.wait_base:
    try:
        return tenacity.wait_exponential_jitter(multiplier=first, max=max_wait)
    except TypeError:
        # tenacity < 9.1 names it ``initial`` (newer ones warn on that name).
        return tenacity.wait_exponential_jitter(initial=first, max=max_wait)


def operation_retry(attempts: int = 6, max_wait: float = 2.0) -> tenacity.Retrying:
    """Retry policy of one store operation: exponential backoff with jitter, bounded."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=_backoff(0.05, max_wait),
        retry=tenacity.retry_if_exception(_is_transient),
        reraise=True,
    )


def reconnect_backoff(max_wait: float = 5.0) -> tenacity.wait.wait_base:
    """Backoff between an agent's reconnect attempts (it never gives up)."""
    return _backoff(0.1, max_wait)


def retry_from_settings(settings: HotswapSettings) -> tenacity.Retrying:
    return operation_retry(settings.retry_attempts, settings.retry_max_wait)


def guarded(retrying: tenacity.Retrying, model: str, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` under ``retrying``, mapping Redis failures to ``HotswapError``.

    Args:
        retrying: the retry policy (``operation_retry``); copied, so one
            policy may serve many threads.
        model: the model named in error messages (``"*"``: none, ``what`` says
            what was read, e.g. "listing models").
        what: what ``fn`` does, as in "while <what>".
        fn: the Redis operation.

    Returns:
        What ``fn`` returned.

    Raises:
        ConfigError: Redis refused the credentials or the ACL user's rights,
            or the sentinels the credentials or the service name (never
            retried: waiting will not fix it).
        StoreFull: Redis refused a write over its ``maxmemory`` (never
            retried: it lasts until memory is freed or the limit raised).
        StoreUnavailable: Redis stayed unreachable for the whole policy, or
            answered with an error.

    Example::

        head = guarded(operation_retry(), "m", "reading head", lambda: client.get(key))
    """
    of = "" if model == "*" else f" for model {model!r}"
    try:
        return retrying.copy()(fn)
    except HotswapError:
        raise
    except redis.AuthenticationError as e:
        raise ConfigError(f"Redis refused the credentials while {what}: {e}") from e
    except sentinel.SentinelSetupError as e:
        raise ConfigError(f"Redis Sentinel could not name the primary while {what}{of}: {e}") from e
    except redis.exceptions.NoPermissionError as e:
        raise ConfigError(f"Redis user may not do this while {what}{of}: {e}") from e
    except TRANSIENT as e:
        check = (
            "the sentinels (HOTSWAP_SENTINELS) and the primary"
            if isinstance(e, redis.sentinel.MasterNotFoundError)
            else "HOTSWAP_REDIS_URL and the server"
        )
        raise StoreUnavailable(
            f"Redis unreachable while {what}{of} ({type(e).__name__}: {e}); check {check}"
        ) from e
    except redis.RedisError as e:
        if _out_of_memory(e):
            raise StoreFull(
                f"Redis is out of memory (maxmemory reached) while {what}{of}: "
                "free memory (hotswap gc) or raise maxmemory"
            ) from e
        raise StoreUnavailable(f"Redis error while {what}{of}: {e}") from e


def connect(settings: HotswapSettings) -> RedisClient:
    """A client for ``settings.redis_url`` (standalone, cluster or Sentinel, TLS, unix, ACL).

    On a cluster the URL may name several seed nodes, comma-separated
    (``redis://a:7000,b:7001``, see ``hotswap.seeds``): the client learns
    the slot map from whichever answers, so losing one seed loses nothing.
    Under Sentinel (``HOTSWAP_SENTINELS`` or a ``redis+sentinel://`` URL) it
    is bound to the primary the sentinels name now, and follows a failover
    (``hotswap.sentinel``).

    Raises:
        ConfigError: the settings are malformed or contradict each other.
        StoreUnavailable: a Redis Cluster could not be reached to learn its
            slot map (other clients connect at their first command).

    Example::

        client = connect(HotswapSettings(redis_url="redis://a:7000,b:7001", cluster=True))
        primary = connect(HotswapSettings(redis_url="redis+sentinel://s1:26379,s2:26379/cache"))
    """
    url = settings.redis_url
    where = sentinel.deployment(settings)
    if where is not None:
        return sentinel.primary_client(settings, where)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"HOTSWAP_REDIS_URL {shown_url(url)!r} must start with redis://, rediss://, "
            "unix:// or redis+sentinel://"
        )
    seeds = parse_seeds(url)
    if seeds.others and not settings.cluster:
        raise ConfigError(
            f"HOTSWAP_REDIS_URL {seeds.shown()!r} names {len(seeds.others) + 1} addresses, "
            "which only a Redis Cluster takes: set HOTSWAP_CLUSTER=true, or name one server"
        )
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
    }
    if not url.startswith("unix://"):
        # redis-py's unix-socket connection refuses this TCP-only option.
        kwargs["socket_keepalive"] = True
    if url.startswith("rediss://"):
        for name, value in (
            ("ssl_ca_certs", settings.tls_ca_file),
            ("ssl_certfile", settings.tls_cert_file),
            ("ssl_keyfile", settings.tls_key_file),
        ):
            if value:
                kwargs[name] = value
    try:
        if settings.cluster:
            if url.startswith("unix://"):
                raise ConfigError("Redis Cluster cannot be reached over a unix:// socket")
            return _cluster(seeds, kwargs)
        # Retries belong to our tenacity policy alone, not also redis-py's.
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)
    except (ValueError, TypeError) as e:
        # The parser's complaint may quote a piece of the password (as a port).
        raise ConfigError(
            f"invalid HOTSWAP_REDIS_URL {shown_url(url)!r}: {scrub(str(e), url)}"
        ) from e


def _cluster(seeds: Seeds, kwargs: dict[str, Any]) -> RedisClient:
    # Unlike redis.Redis, the cluster client connects at once to learn the slot
    # map, and fails with an exception outside redis-py's RedisError tree.
    # The first URL's own address joins ``startup_nodes`` (redis-py adds it).
    url = seeds.first
    nodes = [redis.cluster.ClusterNode(h, p) for h, p in seeds.others]  # type: ignore[no-untyped-call]
    try:
        return redis.cluster.RedisCluster.from_url(url, startup_nodes=nodes, **kwargs)
    except redis.exceptions.NoPermissionError as e:  # COMMAND, asked once the map is known
        raise ConfigError(_cluster_refused(seeds, e)) from e
    except redis.exceptions.RedisClusterException as e:
        where = seeds.shown()
        # redis-py reports any refusal of CLUSTER SLOTS as "Cluster mode is not
        # enabled", the refusal itself a link or two down the exception chain.
        refusal = _refusal(e)
        if refusal is not None:
            raise ConfigError(_cluster_refused(seeds, refusal)) from e
        if "Cluster mode is not enabled" in str(e):
            raise ConfigError(
                f"HOTSWAP_CLUSTER is set but {where} is not a Redis Cluster node; unset it"
            ) from e
        raise StoreUnavailable(
            f"Redis Cluster at {where} unreachable ({scrub(str(e), url)}); "
            "check HOTSWAP_REDIS_URL and the nodes"
        ) from e


def _cluster_refused(seeds: Seeds, e: redis.RedisError) -> str:
    return (
        f"Redis user may not do this while connecting to the Redis Cluster at {seeds.shown()}: "
        f"{scrub(str(e), seeds.first)}; its user needs +cluster|slots +command "
        "(README, Security)"
    )


def _refusal(e: BaseException | None) -> redis.exceptions.NoPermissionError | None:
    seen = 0
    while e is not None and seen < 8:  # a chain is short; never loop on a cycle
        if isinstance(e, redis.exceptions.NoPermissionError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None
