"""Several seed addresses in one ``HOTSWAP_REDIS_URL``, for a Redis Cluster.

Pure: parses text, imports no Redis. The first entry is a whole URL (scheme,
credentials, TLS and options for every node); each later one is either
``host:port`` or a URL of the same scheme, whose credentials, if given, must
be the first's. Commas split entries only where an address follows, so a
comma inside a password does not.

    redis://app:pw@a:7000,b:7001,c:7002
    redis://app:pw@a:7000,redis://b:7001
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from hotswap.errors import ConfigError
from hotswap.redact import redact

DEFAULT_PORT = 6379
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
