"""A real Redis Cluster of 3 masters and 3 replicas, built from ``redis-server`` processes.

No ``redis-cli --cluster create``: the nodes meet, take slots and replicate
by plain ``CLUSTER`` commands, so the fixture needs the server binary only.
The node timeout is long enough that a loaded 2-core machine does not fail a
master over by itself; tests fail one over on purpose (``kill``, ``freeze``,
``CLUSTER FAILOVER``) and wait for the replica to take over.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

import redis
from waiting import poll

from hotswap.embedded import EmbeddedRedis

# Milliseconds a master may be silent before its replica takes over.
NODE_TIMEOUT_MS = 4000
SLOTS = 16384


def _client(node: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=1)


class Cluster:
    """Six nodes: ``masters[i]`` serves a third of the slots, ``replicas[i]`` follows it."""

    def __init__(self, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.node_timeout_ms = node_timeout_ms
        args = ["--cluster-node-timeout", str(node_timeout_ms)]
        self.nodes = [EmbeddedRedis(cluster=True, extra_args=list(args)) for _ in range(6)]
        self.ids: dict[int, str] = {}
        # Ports of nodes stopped by SIGSTOP: alive, but nothing may ask them anything.
        self.frozen: set[int] = set()

    @property
    def masters(self) -> list[EmbeddedRedis]:
        """The nodes that serve slots now (roles change at a failover)."""
        return [n for n in self.alive() if self.role(n) == "master" and self._has_slots(n)]

    def alive(self) -> list[EmbeddedRedis]:
        """Running nodes that answer (frozen ones left out)."""
        return [
            n
            for n in self.nodes
            if n.process is not None and n.process.poll() is None and n.port not in self.frozen
        ]

    def freeze(self, node: EmbeddedRedis) -> None:
        self.frozen.add(node.port)
        node.freeze()

    def failover_to(self, replica: EmbeddedRedis) -> None:
        """A graceful ``CLUSTER FAILOVER``, asked of ``replica``."""
        with _client(replica) as c:
            c.execute_command("CLUSTER", "FAILOVER")

    def role(self, node: EmbeddedRedis) -> str:
        with _client(node) as c:
            return str(c.execute_command("ROLE")[0].decode())

    def _has_slots(self, node: EmbeddedRedis) -> bool:
        with _client(node) as c:
            mine = c.execute_command("CLUSTER", "MYID").decode()
            return any(n["node_id"] == mine for n in self._slot_owners(c))

    @staticmethod
    def _slot_owners(c: redis.Redis) -> list[dict[str, str]]:
        owners = []
        for entry in c.execute_command("CLUSTER", "SLOTS"):
            owners.append({"node_id": entry[2][2].decode(), "port": str(entry[2][1])})
        return owners

    def urls(self, nodes: list[EmbeddedRedis] | None = None) -> str:
        """A comma-separated seed list (``HOTSWAP_REDIS_URL``) of ``nodes`` (default all)."""
        return ",".join(n.url for n in (nodes if nodes is not None else self.nodes))

    def owner_of(self, key: str) -> EmbeddedRedis:
        """The live master serving ``key``'s slot, as the cluster says now."""
        for node in self.alive():
            with contextlib.suppress(redis.RedisError), _client(node) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for entry in c.execute_command("CLUSTER", "SLOTS"):
                    if int(entry[0]) <= slot <= int(entry[1]):
                        port = int(entry[2][1])
                        return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no live node knows who serves {key!r}")

    def replica_of(self, master: EmbeddedRedis) -> EmbeddedRedis:
        with _client(master) as c:
            mine = c.execute_command("CLUSTER", "MYID").decode()
        for node in self.alive():
            if node is master:
                continue
            with _client(node) as c:
                info = c.execute_command("CLUSTER", "NODES").decode()
            for line in info.splitlines():
                fields = line.split()
                if "myself" in fields[2] and fields[3] == mine:
                    return node
        raise AssertionError(f"master on port {master.port} has no live replica")

    def healthy(self) -> bool:
        """Every live node says the cluster is ok and every slot has a live master."""
        try:
            for node in self.alive():
                with _client(node) as c:
                    if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                        return False
                    served = sum(
                        int(e[1]) - int(e[0]) + 1 for e in c.execute_command("CLUSTER", "SLOTS")
                    )
                    alive_ports = {n.port for n in self.alive()}
                    if served != SLOTS or any(
                        int(e[2][1]) not in alive_ports
                        for e in c.execute_command("CLUSTER", "SLOTS")
                    ):
                        return False
        except redis.RedisError:
            return False
        return True

    def poll_until_served_by(self, key: str, node: EmbeddedRedis) -> bool:
        """Whether, in time, the cluster became healthy with ``node`` serving ``key``
        (a failover to it finished)."""

        def served() -> bool:
            try:
                return self.healthy() and self.owner_of(key) is node
            except AssertionError:
                return False

        return poll(served, attempts=int(self.node_timeout_ms / 20) * 6)

    def start(self) -> Cluster:
        try:
            for node in self.nodes:
                node.start()
            clients = [_client(n) for n in self.nodes]
            for i, c in enumerate(clients):
                self.ids[i] = c.execute_command("CLUSTER", "MYID").decode()
            first = self.nodes[0]
            for c in clients[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port)
            third = SLOTS // 3
            ranges = [(0, third - 1), (third, 2 * third - 1), (2 * third, SLOTS - 1)]
            for c, (lo, hi) in zip(clients[:3], ranges, strict=True):
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)

            def all_met() -> bool:
                return all(
                    c.execute_command("CLUSTER", "NODES").decode().count("connected") >= 6
                    for c in clients
                )

            assert poll(all_met, attempts=1000), "cluster nodes did not meet"
            for i in range(3):
                clients[3 + i].execute_command("CLUSTER", "REPLICATE", self.ids[i])

            def synced() -> bool:
                for c in clients[3:]:
                    info = c.info("replication")
                    if info.get("master_link_status") != "up":
                        return False
                return self.healthy()

            assert poll(synced, attempts=1500), "cluster did not become healthy"
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    def restore(self) -> None:
        """Restart dead nodes (they rejoin as replicas) and wait until all is healthy."""
        for node in self.nodes:
            node.thaw()
            self.frozen.discard(node.port)
            if node.process is None or node.process.poll() is not None:
                node.start()
        assert poll(self._settled, attempts=2000), "cluster did not settle after restore"

    def _settled(self) -> bool:
        if not self.healthy():
            return False
        for node in self.nodes:
            with _client(node) as c:
                if self.role(node) == "slave":
                    if c.info("replication").get("master_link_status") != "up":
                        return False
        return len(self.masters) == 3

    def flush(self) -> None:
        for node in self.masters:
            with _client(node) as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
