"""Several seed addresses in one ``HOTSWAP_REDIS_URL``, for a Redis Cluster or Sentinel.

Pure: parses text, imports no Redis. The first entry is a whole URL (scheme,
credentials, TLS and options for every node); each later one is either
``host:port`` or a URL of the same scheme, whose credentials, if given, must
be the first's. Commas split entries only where an address follows, so a
comma inside a password does not.

    redis://app:pw@a:7000,b:7001,c:7002
    redis://app:pw@a:7000,redis://b:7001

A Sentinel deployment is named by its sentinels and the service they watch,
as ``redis+sentinel://[user:pass@]host1:port1,host2:port2/SERVICE[/DB]``
(``parse_sentinel_url``; the credentials are the data nodes'), or by a bare
``host:port`` list (``parse_addresses``, for ``HOTSWAP_SENTINELS``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from hotswap.errors import ConfigError
from hotswap.redact import redact

DEFAULT_PORT = 6379
SENTINEL_PORT = 26379
SENTINEL_SCHEME = "redis+sentinel://"
# A comma ends an entry only where a URL or a host:port begins after it.
_SPLIT = re.compile(
    r",\s*(?=(?:rediss?|unix)://|(?:\[[0-9A-Fa-f:.]+\]|[^\s,/@:\[\]]+):\d+/?\s*(?:,|$))"
)
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s,/@:\[\]]+)):(?P<port>\d+)/?$"
)


@dataclass(frozen=True)
class Seeds:
    """The first URL whole, and the addresses of the other seeds."""

    first: str
    others: tuple[tuple[str, int], ...]

    def shown(self) -> str:
        """The list as configured, passwords masked."""
        return ",".join([redact(self.first), *(_address(h, p) for h, p in self.others)])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shown(url: str) -> str:
    """``url`` with the password of each entry masked (``redact`` entry by entry).

    Example:
        >>> shown("redis://app:pw@a:7000,redis://app:pw@b:7001")
        'redis://app:***@a:7000,redis://app:***@b:7001'
    """
    if is_sentinel_url(url):
        return redact(url)  # one URL, whose commas separate sentinels
    return ",".join(redact(part) for part in split(url))


def split(url: str) -> list[str]:
    """The entries of ``url``, blanks around commas dropped.

    Example:
        >>> split("redis://a:7000, b:7001")
        ['redis://a:7000', 'b:7001']
    """
    return [part.strip() for part in _SPLIT.split(url.strip())]


def _creds(url: str) -> tuple[str | None, str | None]:
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return user, password


def parse(url: str) -> Seeds:
    """Split ``url`` into its first URL and the other seeds' addresses.

    Raises:
        ConfigError: a later entry is neither ``host:port`` nor a URL of the
            first's scheme, or names other credentials than the first.

    Example:
        >>> parse("redis://a:7000,redis://b:7001,c:7002").others
        (('b', 7001), ('c', 7002))
    """
    first, *rest = split(url)
    scheme = first.partition("://")[0]
    others: list[tuple[str, int]] = []
    for entry in rest:
        plain = _HOST_PORT.match(entry)
        if plain is not None:
            others.append((plain["v6"] or plain["host"], int(plain["port"])))
            continue
        shown = redact(entry)
        if entry.partition("://")[0] != scheme or "://" not in entry:
            raise ConfigError(
                f"HOTSWAP_REDIS_URL entry {shown!r} must be host:port or a {scheme}:// URL "
                f"like the first (e.g. {scheme}://host:7000,host2:7001)"
            )
        user, password = _creds(entry)
        if (user or password) and (user, password) != _creds(first):
            raise ConfigError(
                f"HOTSWAP_REDIS_URL entry {shown!r} names other credentials than the "
                "first: every node is reached with the first URL's; leave them out"
            )
        try:
            parts = urlsplit(entry)
            host, port = parts.hostname, parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ConfigError(f"HOTSWAP_REDIS_URL entry {shown!r} has no valid port") from e
        if not host:
            raise ConfigError(f"HOTSWAP_REDIS_URL entry {shown!r} names no host")
        others.append((host, port))
    return Seeds(first, tuple(others))


# -- Sentinel -------------------------------------------------------------------------

_ADDRESS = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s,/@:\[\]]+))(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL names: sentinels, service, db and the data
    nodes' credentials (None where the URL leaves them out)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str | None
    db: int
    username: str | None
    password: str | None


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel deployment (``redis+sentinel://``).

    Example:
        >>> is_sentinel_url("redis+sentinel://s1:26379/mymaster")
        True
    """
    return url.strip().lower().startswith(SENTINEL_SCHEME)


def parse_addresses(text: str, where: str) -> tuple[tuple[str, int], ...]:
    """The comma-separated ``host[:port]`` list ``text`` (port 26379 if left out).

    Args:
        text: the list, e.g. ``s1:26379, s2:26379``.
        where: what the list was read from, for messages (``HOTSWAP_SENTINELS``).

    Raises:
        ConfigError: an entry is not ``host[:port]``, or the list is empty.

    Example:
        >>> parse_addresses("s1:26380, [::1]", "HOTSWAP_SENTINELS")
        (('s1', 26380), ('::1', 26379))
    """
    found: list[tuple[str, int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        match = _ADDRESS.match(entry)
        if match is None or not 0 < int(match["port"] or SENTINEL_PORT) < 65536:
            raise ConfigError(
                f"{where} entry {redact(entry)!r} must be host:port "
                "(e.g. sentinel-1:26379,sentinel-2:26379)"
            )
        found.append((match["v6"] or match["host"], int(match["port"] or SENTINEL_PORT)))
    if not found:
        raise ConfigError(f"{where} names no sentinel: list them as host:port,host:port")
    return tuple(found)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read ``redis+sentinel://[user:pass@]host1:port1,host2:port2/SERVICE[/DB]``.

    Raises:
        ConfigError: no sentinel, a bad address or database number, a query
            string, or more path than ``/SERVICE/DB``.

    Example:
        >>> u = parse_sentinel_url("redis+sentinel://app:pw@s1:26379,s2/cache/2")
        >>> u.sentinels, u.service, u.db, u.username
        ((('s1', 26379), ('s2', 26379)), 'cache', 2, 'app')
    """
    shown = redact(url)
    rest = url.strip()[len(SENTINEL_SCHEME) :]
    if "?" in rest or "#" in rest:
        raise ConfigError(
            f"HOTSWAP_REDIS_URL {shown!r}: a redis+sentinel:// URL takes no options; "
            "set them as HOTSWAP_* settings"
        )
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, password = (None, None)
    if at:
        name, colon, secret = userinfo.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if colon else None
    sentinels = parse_addresses(hosts, f"HOTSWAP_REDIS_URL {shown!r}:")
    parts = [p for p in path.split("/") if p] if path.strip("/") else []
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(
            f"HOTSWAP_REDIS_URL {shown!r}: the path must be /SERVICE or /SERVICE/DB "
            "(e.g. redis+sentinel://s1:26379,s2:26379/mymaster/0)"
        )
    service = unquote(parts[0]) if parts else None
    return SentinelURL(sentinels, service, int(parts[1]) if len(parts) == 2 else 0, user, password)
