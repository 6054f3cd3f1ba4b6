"""A throw-away Redis Cluster on 127.0.0.1: three masters and three replicas, started and torn down by the tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from redis.cluster import RedisCluster

from tests.conftest import RedisServer, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            return port


@dataclass
class ClusterNode:
    server: RedisServer

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def node_id(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def role(self) -> str:
        with self.client() as client:
            return str(client.info("replication")["role"])


@dataclass
class Cluster:
    """`redis-server --cluster-enabled yes` six times, joined by `redis-cli --cluster create --cluster-replicas 1`."""

    size: int = 6
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Any one node is enough: the service discovers the rest."""
        return f"redis://127.0.0.1:{self.live_nodes()[0].port}/0"

    def start(self) -> None:
        for _ in range(self.size):
            server = RedisServer(
                _cluster_port(),
                extra=["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                       "--cluster-config-file", "nodes.conf", "--cluster-replica-validity-factor", "0",
                       # replicas in sync at once, not after the default 5 s wait for more replicas
                       "--repl-diskless-sync-delay", "0"],
            )  # fmt: skip
            server.start()
            self.nodes.append(ClusterNode(server))
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        self.wait_healthy()

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.server.proc is not None and n.server.proc.poll() is None]

    def masters(self) -> list[ClusterNode]:
        return [n for n in self.live_nodes() if n.role() == "master"]

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.live_nodes()[0].port, decode_responses=True)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok, with three masters covering all slots."""
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become healthy in time")
            time.sleep(0.1)  # cluster gossip has no event to await

    def _healthy(self) -> bool:
        try:
            for node in self.live_nodes():
                with node.client() as client:
                    info = client.cluster("info")
                    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                        return False
                    if int(info["cluster_known_nodes"]) < len(self.live_nodes()):
                        return False
            return len(self.masters()) == 3 and all(self._in_sync(n) for n in self.live_nodes())
        except redis.RedisError:
            return False

    @staticmethod
    def _in_sync(node: ClusterNode) -> bool:
        """A master, or a replica whose link to its master is up (its first full sync done)."""
        with node.client() as client:
            info = client.info("replication")
        return bool(info["role"] == "master" or info.get("master_link_status") == "up")

    def owner_of(self, key: str) -> ClusterNode:
        """The live master that serves `key`'s slot now."""
        with self.client() as client:
            node = client.get_node_from_key(key)
        return next(n for n in self.live_nodes() if n.port == node.port)

    def flush(self) -> None:
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def restore(self) -> None:
        """Bring killed nodes back (they rejoin as replicas) and wait until healthy, for the next test."""
        for node in self.nodes:
            if node.server.proc is None or node.server.proc.poll() is not None:
                node.server.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.server.cleanup()


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
