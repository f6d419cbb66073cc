"""bench.netlink: Redis behind a veth pair held to a rate (root and iproute2 only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

# bench/ is a folder of the checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.netlink import LinkedRedis, LinkError, rate_bits


def test_rates_read_as_tc_writes_them() -> None:
    assert rate_bits("1gbit") == 1e9
    assert rate_bits("2.5gbit") == 2.5e9
    assert rate_bits("500mbit") == 5e8
    with pytest.raises(LinkError, match="write it as tc does"):
        rate_bits("1GB/s")


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
    reason="needs root and iproute2",
)
def test_a_linked_redis_answers_through_its_link_and_leaves_nothing() -> None:
    with LinkedRedis("1gbit") as srv:
        client = redis.Redis.from_url(srv.url)
        client.set("k", b"x" * 100_000)
        assert client.get("k") == b"x" * 100_000
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", srv.host_dev], capture_output=True, text=True, check=True
        )
        assert "tbf" in shown.stdout and "1Gbit" in shown.stdout
        client.close()
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert srv.ns not in namespaces
