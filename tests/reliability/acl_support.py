"""The documented ACL block (docs/reliability.md, README Security) on a private server.

The block turns the ``default`` user off, so whoever applies it continues as
the documented admin user: ``apply_documented`` returns a client of that user.
"""

from __future__ import annotations

import redis
from rel_support import acl_lines

from hotswap.embedded import EmbeddedRedis

ADMIN = "hotswap-admin"
PUBLISHER = "hotswap-publisher"


def users() -> list[str]:
    """The users the block makes, in its order (``default`` included)."""
    return [line.split()[2] for line in acl_lines()]


def agent_user() -> str:
    """The block's per-agent user: ``hotswap-agent-<ID>``."""
    (user,) = [u for u in users() if u.startswith("hotswap-agent-")]
    return user


def agent_id() -> str:
    """The ``HOTSWAP_AGENT_ID`` the block's agent user is fenced to."""
    return agent_user().removeprefix("hotswap-agent-")


def user_url(server: EmbeddedRedis, user: str) -> str:
    """A redis:// URL logging in as ``user`` with the block's password for it."""
    for line in acl_lines():
        words = line.split()
        if words[2] == user:
            secret = next(w[1:] for w in words if w.startswith(">"))
            return f"redis://{user}:{secret}@127.0.0.1:{server.port}/0"
    raise AssertionError(f"no ACL line for {user}")


def apply_documented(server: EmbeddedRedis) -> redis.Redis:
    """Run the block's lines verbatim, in order, as a fresh server's default user does.

    Returns:
        A client of the documented admin user, the ACL log reset.
    """
    default = redis.Redis.from_url(server.url, socket_timeout=5)
    for line in acl_lines():
        assert default.execute_command(*line.split()) in (b"OK", "OK", True)
    default.close()
    admin = redis.Redis.from_url(user_url(server, ADMIN), socket_timeout=5)
    admin.execute_command("ACL", "LOG", "RESET")
    return admin
