"""A redis-server behind a network link: its own network namespace, reached over a
veth pair, optionally held to a rate by a token bucket (``tc tbf``) on both ends.

Loopback moves 64 MiB in a few tens of milliseconds and charges no wire time,
so it hides what a delta saves; a veth pair costs what a NIC's driver path
does in the kernel, and a rate limit makes the wire as slow as a real link.
Every process of a benchmark (publisher, agents, baselines) sits in the
host's namespace and reaches Redis through the link. Linux only, as root,
with ``ip`` and ``tc`` (iproute2); ``LinkError`` says what is missing.

Example::

    with LinkedRedis("1gbit") as srv:
        client = redis.Redis.from_url(srv.url)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from types import TracebackType

import redis

from hotswap.embedded import find_redis_server

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
_SCALE = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}


class LinkError(RuntimeError):
    """The link could not be made (not root, no iproute2, a bad rate)."""


def rate_bits(rate: str) -> float:
    """``"2.5gbit"`` -> bits per second; LinkError for anything else."""
    found = _RATE.match(rate)
    if not found:
        raise LinkError(f"link rate {rate!r}: write it as tc does, e.g. 1gbit, 2.5gbit, 500mbit")
    return float(found.group(1)) * _SCALE[found.group(2)]


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise LinkError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


class LinkedRedis:
    """A private redis-server in a network namespace behind a veth pair (see module doc).

    Args:
        rate: a ``tc`` rate (``"1gbit"``) held on both directions, or None for the
            bare veth pair.
    """

    def __init__(self, rate: str | None = None) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise LinkError("--link needs root and iproute2 (ip, tc) on Linux")
        self.rate = rate
        self.bits = rate_bits(rate) if rate else None
        tag = f"{os.getpid() % 100000}"
        self.ns, self.host_dev, self.ns_dev = f"hsb{tag}", f"hsb{tag}h", f"hsb{tag}n"
        octet = os.getpid() % 250 + 1
        self.host_ip, self.ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.port = 6390
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = ""

    @property
    def url(self) -> str:
        return f"redis://{self.ns_ip}:{self.port}/0"

    @property
    def label(self) -> str:
        return f"veth, {self.rate}" if self.rate else "veth, no rate limit"

    def start(self) -> LinkedRedis:
        try:
            self._link()
            self._dir = tempfile.mkdtemp(prefix="hotswap-linked-redis-")
            self.process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.ns, find_redis_server()),
                    *("--port", str(self.port), "--bind", self.ns_ip, "--protected-mode", "no"),
                    *("--save", "", "--appendonly", "no", "--dir", self._dir),
                    *("--logfile", os.path.join(self._dir, "redis.log")),
                ]
            )
            client = redis.Redis(host=self.ns_ip, port=self.port, socket_connect_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise LinkError("redis-server behind the link did not answer") from None
                    time.sleep(0.05)
            client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _link(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        _run("ip", "link", "set", self.ns_dev, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _run("ip", "link", "set", self.host_dev, "up")
        inside = ("ip", "netns", "exec", self.ns)
        _run(*inside, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
        _run(*inside, "ip", "link", "set", self.ns_dev, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        if self.bits is not None:
            # A bucket of 2 ms at the rate (at least 256 KiB): tbf needs at least
            # rate / HZ to reach its rate at all.
            burst = str(max(256 * 1024, int(self.bits / 8 / 500)))
            for prefix, dev in (((), self.host_dev), (inside, self.ns_dev)):
                _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                     str(self.rate), "burst", burst, "latency", "100ms")  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LinkedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
