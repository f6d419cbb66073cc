"""Helpers of the reliability suite: small models, settings, and the one invariant.

The invariant every fault test ends with: the live model is bit-equal to one
published manifest (never a mix of two), and nothing committed was lost.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis
import torch

from hotswap import codec
from hotswap.connection import operation_retry
from hotswap.embedded import EmbeddedRedis
from hotswap.manifest import Manifest
from hotswap.settings import HotswapSettings
from hotswap.status import AgentStatus
from hotswap.status import decode as decode_status
from hotswap.store import Store

MODEL = "rel"
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def make_state(seed: int, tensors: int = 6, width: int = 32) -> dict[str, torch.Tensor]:
    """A small float32 state dict, different for every seed."""
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i:02d}.weight": torch.randn(width, width, generator=g) for i in range(tensors)}


def nudged(state: Mapping[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    """A plausible next version: every tensor moved a little (passes the norm checks)."""
    return {k: v + delta for k, v in state.items()}


def live_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a serving process holds (an Agent accepts a plain mapping)."""
    return {k: v.clone() for k, v in state.items()}


def digests(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: codec.digest(codec.as_bytes(v)) for k, v in state.items()}


def content(m: Manifest) -> dict[str, str]:
    return {t.name: t.digest for t in m.tensors}


def settings_for(server: EmbeddedRedis | str, **changes: Any) -> HotswapSettings:
    """Short timeouts and retries: faults surface in about a second."""
    fields: dict[str, Any] = {
        "redis_url": server if isinstance(server, str) else server.url,
        "chunk_bytes": 64 * 1024,
        "poll_interval": 0.5,
        "retry_attempts": 3,
        "retry_max_wait": 0.2,
        "socket_timeout": 2.0,
        "connect_timeout": 1.0,
        "_env_file": None,
    }
    fields.update(changes)
    return HotswapSettings(**fields)


def admin_store(server: EmbeddedRedis, model: str = MODEL) -> Store:
    """A Store on the default (admin) user, for looking at what the system wrote."""
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    return Store(client, model, retrying=operation_retry(5, 0.2))


def manifests(store: Store) -> dict[int, Manifest]:
    return {v: store.manifest(v) for v in store.versions()}


def matching_versions(store: Store, live: Mapping[str, torch.Tensor]) -> list[int]:
    """Versions whose every tensor digest equals the live model's."""
    now = digests(live)
    return [v for v, m in manifests(store).items() if content(m) == now]


def assert_runs_exactly(store: Store, live: Mapping[str, torch.Tensor], version: int) -> None:
    """The live model is bit-equal to ``version``'s manifest, and to no differing one."""
    found = matching_versions(store, live)
    assert version in found, f"live model matches versions {found}, expected v{version}"
    wanted = content(store.manifest(version))
    for v in found:
        assert content(store.manifest(v)) == wanted


def agent_status(store: Store, agent_id: str) -> AgentStatus | None:
    for found, raw, _alive in store.agent_records():
        if found == agent_id:
            return decode_status(raw)
    return None


def eventually(check: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def acl_lines() -> list[str]:
    """The one fenced block of docs/reliability.md made of ``ACL SETUSER`` lines."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [
        b.strip().splitlines()
        for b in blocks
        if b.strip() and all(line.startswith("ACL SETUSER ") for line in b.strip().splitlines())
    ]
    assert len(found) == 1, f"{DOC} must hold exactly one block of ACL SETUSER lines"
    return found[0]


def apply_acl(admin: redis.Redis) -> None:
    """Load the documented users into a server (as its default, admin user)."""
    for line in acl_lines():
        assert admin.execute_command(*line.split()) in (b"OK", "OK", True)
    admin.execute_command("ACL", "LOG", "RESET")


def acl_url(server: EmbeddedRedis, user: str) -> str:
    """A redis:// URL logging in as one of the documented users."""
    for line in acl_lines():
        words = line.split()
        if words[2] == user:
            secret = next(w[1:] for w in words if w.startswith(">"))
            return f"redis://{user}:{secret}@127.0.0.1:{server.port}/0"
    raise AssertionError(f"no ACL line for {user}")
