"""Secrets out of every message: the password of a Redis URL shown as ``***``.

Pure: imports no Redis. Every message, banner and log line that shows a URL
shows ``redact(url)``; text that may quote a piece of a URL it does not show
whole (a parser's complaint about a port, a traceback) goes through
``scrub(text, url)``, which also replaces each secret wherever it appears.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
# Query parameters whose value is taken for a secret: redis-py reads
# ``password``; the rest are what a secret is usually called.
SECRET_PARAM = re.compile(r"pass|pwd|secret|token|auth|cred|key", re.IGNORECASE)
MIN_PIECE = 4


def _query_secrets(query: str) -> list[str]:
    values = []
    for param in re.split(r"[&;]", query):
        name, eq, value = param.partition("=")
        if eq and SECRET_PARAM.search(unquote(name)):
            values.append(value)
    return values


def secrets(url: str) -> set[str]:
    """Every part of ``url`` that may be a secret, raw and percent-decoded.

    A password may hold ``@``, ``?`` or ``/`` unencoded, which parsers split
    differently, so the userinfo is read both with and without cutting the
    query off first: whatever either reading could send as a password counts.

    Args:
        url: a Redis URL as configured (any text is accepted).

    Returns:
        The password of the userinfo and the values of secret-looking query
        parameters (empty strings left out).

    Example:
        >>> sorted(secrets("redis://app:s3cret@cache:6379/0?password=other"))
        ['other', 's3cret']
    """
    _, sep, rest = url.partition("://")
    if not sep:
        rest = url
    found: set[str] = set()
    for main in (rest.partition("?")[0], rest):
        creds, at, _ = main.rpartition("@")
        if at and ":" in creds:
            found.add(creds.split(":", 1)[1])
    for query in (rest.partition("?")[2], rest.rpartition("@")[2].partition("?")[2]):
        found.update(_query_secrets(query))
    # A parser that cuts the host part at '/', '?' or '#' may quote a piece of
    # the password alone (as a port it could not read): those pieces count too,
    # unless too short to give anything away and too common to mask everywhere.
    found |= {p for s in found for p in re.split(r"[/?#]", s) if len(p) >= MIN_PIECE}
    found |= {unquote(s) for s in found}
    found.discard("")
    return found


def redact(url: str) -> str:
    """``url`` with its password and secret-looking query values replaced by ``***``.

    Args:
        url: a Redis URL (``redis://``, ``rediss://``, ``unix://``, or anything).

    Returns:
        The URL as it may be shown: user name, host, port, database and other
        parameters kept.

    Example:
        >>> redact("redis://app:s3cret@cache:6379/0")
        'redis://app:***@cache:6379/0'
        >>> redact("unix:///run/redis.sock?db=1&password=s3cret")
        'unix:///run/redis.sock?db=1&password=***'
    """
    return _mask(url, secrets(url))


def _mask(text: str, found: set[str]) -> str:
    # Longest first: a secret that holds another is masked whole.
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def scrub(text: str, *urls: str | None) -> str:
    """``text`` with every secret of ``urls`` (None ignored) replaced by ``***``.

    For messages and tracebacks that may quote part of a URL, whole or not.

    Example:
        >>> scrub("port could not be cast: 's3cret'", "redis://u:s3cret/x@h")
        "port could not be cast: '***'"
    """
    found: set[str] = set()
    for url in urls:
        if url:
            found |= secrets(url)
    return _mask(text, found)
