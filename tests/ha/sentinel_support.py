"""A real Sentinel deployment: a primary, one replica and three sentinels, from ``redis-server``.

The data nodes are ``EmbeddedRedis`` processes (the replica started with
``--replicaof``); each sentinel is ``redis-server CONF --sentinel`` with a
config file of its own, which it rewrites as it learns the topology. The
sentinels judge a primary down after ``DOWN_AFTER_MS`` of silence: long
enough that a loaded 2-core machine does not fail over by itself, short
enough for tests, which fail the primary over on purpose (``kill``,
``sentinel_failover``) and wait for the replica to take over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from waiting import poll

from hotswap.embedded import EmbeddedRedis, find_redis_server, free_port

SERVICE = "hotswap-primary"
# Milliseconds of silence before a sentinel calls the primary down.
DOWN_AFTER_MS = 2500
# Bounds one failover's steps; also the gap sentinels keep between two
# automatic failovers of one primary (twice this), so it is kept small.
FAILOVER_TIMEOUT_MS = 4000
QUORUM = 2


def _client(port: int, password: str | None = None) -> redis.Redis:
    # No retries: a question to a dead node is answered by its failure, at once.
    return redis.Redis(
        port=port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )


class SentinelProcess:
    """One ``redis-server --sentinel`` on a free port, watching ``SERVICE``."""

    def __init__(self, lines: list[str] | None = None) -> None:
        self.port = free_port()
        # Extra sentinel.conf lines (``user ...`` rules), written before the monitor line.
        self.lines = list(lines or [])
        # The fixture asks as the default user: with its password where a line sets one.
        self.password = next(
            (line.split(None, 1)[1] for line in self.lines if line.startswith("requirepass ")),
            None,
        )
        self.dir = tempfile.mkdtemp(prefix="hotswap-sentinel-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, primary_port: int) -> SentinelProcess:
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        f"dir {self.dir}",
                        f"logfile {os.path.join(self.dir, 'sentinel.log')}",
                        *self.lines,
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {QUORUM}",
                        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                        f"sentinel parallel-syncs {SERVICE} 1",
                        "",
                    ]
                )
            )
        self.process = subprocess.Popen(
            [find_redis_server(), conf, "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert poll(self._answers, attempts=500), f"sentinel on port {self.port} did not start"
        return self

    def admin(self) -> redis.Redis:
        """A client of this sentinel as its default user (close it)."""
        return _client(self.port, self.password)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sentinel exited at start: {self.log_tail()}")
        with contextlib.suppress(redis.RedisError), _client(self.port, self.password) as c:
            return bool(c.execute_command("SENTINEL", "MASTERS") is not None)
        return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "sentinel.log")) as f:
            return " | ".join(f.read().splitlines()[-5:])
        return ""

    def master_port(self) -> int | None:
        """The primary's port this sentinel names now (None: it does not answer)."""
        with contextlib.suppress(redis.RedisError), _client(self.port, self.password) as c:
            reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return None if reply is None else int(reply[1])
        return None

    def knows(self, peers: int, replicas: int) -> bool:
        """Whether it sees ``peers`` other sentinels and ``replicas`` live replicas."""
        with contextlib.suppress(redis.RedisError), _client(self.port, self.password) as c:
            state = c.sentinel_master(SERVICE)
            if int(state["num-other-sentinels"]) < peers or state["is_sdown"]:
                return False
            seen = c.sentinel_slaves(SERVICE)
            live = [r for r in seen if not (r["is_sdown"] or r["is_odown"])]
            return len(live) >= replicas and all(r.get("master-link-status") == "ok" for r in live)
        return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSet:
    """``nodes[0]`` starts as the primary, ``nodes[1]`` as its replica; three sentinels.

    Roles change at a failover: ``primary()`` and ``replica()`` ask the
    sentinels and the nodes who is what now.
    """

    def __init__(self, sentinel_lines: list[str] | None = None) -> None:
        self.nodes = [EmbeddedRedis(), EmbeddedRedis()]
        self.sentinels = [SentinelProcess(sentinel_lines) for _ in range(3)]
        self.frozen: set[int] = set()

    # -- who is what -----------------------------------------------------------------

    def addresses(self, sentinels: list[SentinelProcess] | None = None) -> str:
        """``HOTSWAP_SENTINELS``: the sentinels' comma-separated ``host:port`` list."""
        return ",".join(s.address for s in (self.sentinels if sentinels is None else sentinels))

    def url(self, db: int = 0) -> str:
        """The ``redis+sentinel://`` form of ``HOTSWAP_REDIS_URL`` for this set."""
        return f"redis+sentinel://{self.addresses()}/{SERVICE}/{db}"

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def role(self, node: EmbeddedRedis) -> str | None:
        with contextlib.suppress(redis.RedisError), _client(node.port) as c:
            return str(c.execute_command("ROLE")[0].decode())
        return None

    def primary(self) -> EmbeddedRedis:
        """The node every live sentinel names, which says it is a master."""
        ports = {s.master_port() for s in self.sentinels if s.alive()}
        assert len(ports) == 1 and None not in ports, f"sentinels disagree: {ports}"
        (port,) = ports
        assert port is not None
        return self.node(port)

    def replica(self) -> EmbeddedRedis:
        (other,) = [n for n in self.nodes if n is not self.primary()]
        return other

    def serves(self, node: EmbeddedRedis) -> bool:
        """Every live sentinel names ``node`` and it is a master (the switch is done)."""
        live = [s for s in self.sentinels if s.alive()]
        return all(s.master_port() == node.port for s in live) and self.role(node) == "master"

    def poll_until_primary(self, node: EmbeddedRedis) -> bool:
        """Whether, in time, ``node`` became the primary every sentinel names."""
        return poll(lambda: self.serves(node), attempts=int(DOWN_AFTER_MS / 20) * 8)

    def demoted(self, node: EmbeddedRedis) -> bool:
        """``node`` (a former primary still running) follows the new one, link up."""
        with contextlib.suppress(redis.RedisError), _client(node.port) as c:
            info = c.info("replication")
            return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")
        return False

    # -- faults ----------------------------------------------------------------------

    def freeze(self, node: EmbeddedRedis) -> None:
        """SIGSTOP ``node``: alive, silent. ``restore`` restarts it as a replica (thawed,
        a frozen primary would take writes until the sentinels convert it, seconds on)."""
        self.frozen.add(node.port)
        node.freeze()

    def sentinel_failover(self) -> None:
        """``SENTINEL FAILOVER``: promote the replica without asking the others."""
        live = next(s for s in self.sentinels if s.alive())
        with _client(live.port, live.password) as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)

    # -- life ------------------------------------------------------------------------

    def start(self) -> SentinelSet:
        try:
            primary, replica = self.nodes
            primary.start()
            replica.extra_args = ["--replicaof", "127.0.0.1", str(primary.port)]
            replica.start()
            for s in self.sentinels:
                s.start(primary.port)
            assert poll(self._settled, attempts=1500), "sentinel set did not settle"
        except BaseException:
            self.stop()
            raise
        return self

    def _settled(self) -> bool:
        """Three sentinels agree on a master, see each other and one live replica in sync."""
        try:
            primary = self.primary()
        except AssertionError:
            return False
        if self.role(primary) != "master":
            return False
        if not all(s.alive() for s in self.sentinels):
            return False
        return all(s.knows(peers=2, replicas=1) for s in self.sentinels)

    def restore(self) -> None:
        """Restart what a test killed (a data node as the primary's replica) and wait
        until the set is whole: both data nodes up, sentinels agreeing and in sync."""
        for s in self.sentinels:
            if not s.alive():
                assert s.process is not None
                s.start(self.primary().port)
        primary = self.primary()
        for node in self.nodes:
            if node.port in self.frozen and node is not primary:
                node.kill()
            self.frozen.discard(node.port)
            node.thaw()
            if node is not primary and (node.process is None or node.process.poll() is not None):
                node.extra_args = ["--replicaof", "127.0.0.1", str(primary.port)]
                node.start()
        assert poll(self._settled, attempts=2000), "sentinel set did not settle after restore"

    def flush(self) -> None:
        with _client(self.primary().port) as c:
            c.flushall()
        assert poll(self._replica_empty, attempts=500), "the replica kept keys"

    def _replica_empty(self) -> bool:
        with _client(self.replica().port) as c:
            return int(c.dbsize()) == 0

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
