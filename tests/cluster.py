"""A throw-away Redis Cluster on 127.0.0.1: three masters and three replicas, started and torn down by the tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
        return str(self.replication()["role"])

    def replication(self) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info("replication"))

    def read_local(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Read commands answered from this node's own data, a replica's too (READONLY), not redirected."""
        with self.client() as client, client.pipeline(transaction=False) as pipe:
            pipe.execute_command("READONLY")
            for command in commands:
                pipe.execute_command(*command)
            return list(pipe.execute())[1:]

    def topology(self) -> dict[int, tuple[str, int | None, str]]:
        """This node's view of the cluster (CLUSTER NODES): port → (role, the port of its master, its slots).

        The role is "failing" for a node this one flags as failing or is still shaking hands with.
        """
        with self.client() as client:
            rows = [line.split() for line in str(client.execute_command("CLUSTER", "NODES")).splitlines() if line]
        ports = {row[0]: int(row[1].split("@")[0].rsplit(":", 1)[1]) for row in rows}
        view: dict[int, tuple[str, int | None, str]] = {}
        for node_id, _, flags, master, *rest in rows:
            marks = set(flags.split(","))
            role = "master" if "master" in marks else "replica"
            if marks & {"fail", "fail?", "handshake", "noaddr"}:
                role = "failing"
            view[ports[node_id]] = (role, ports.get(master), " ".join(rest[4:]))
        return view


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
                log=True,
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
        """Until every live node says the cluster is ok, with three masters covering all slots, every live node
        sees the same masters, replicas and slots, and every replica has caught up with its master.

        With every node alive, each master has exactly one replica: the one that takes over if it fails.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become healthy in time")
            time.sleep(0.1)  # cluster gossip has no event to await

    def _healthy(self) -> bool:
        try:
            live = self.live_nodes()
            for node in live:
                with node.client() as client:
                    info = client.cluster("info")
                    if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                        return False
                    if int(info["cluster_known_nodes"]) < len(live):
                        return False
            view = self._agreed_view(live)
            return view is not None and self._replicated(live, view)
        except redis.RedisError:
            return False

    @staticmethod
    def _agreed_view(live: list[ClusterNode]) -> dict[int, tuple[str, int | None, str]] | None:
        """The view of the live nodes that every live node shares (same roles, masters and slots), if they agree."""
        ports = {node.port for node in live}
        views = [{port: seen for port, seen in node.topology().items() if port in ports} for node in live]
        if any(view != views[0] for view in views) or any(role == "failing" for role, _, _ in views[0].values()):
            return None
        return views[0]

    def _replicated(self, live: list[ClusterNode], view: dict[int, tuple[str, int | None, str]]) -> bool:
        """Three masters; each replica's link up to the master the cluster gives it, and caught up with it."""
        first = {node.port: node.replication() for node in live}
        masters = {port: info for port, info in first.items() if info["role"] == "master"}
        if len(masters) != 3:
            return False
        # Read after the masters: a replica that has caught up holds at least the offset its master had then.
        replicas = {node.port: node.replication() for node in live if node.port not in masters}
        if any(view[port][0] != "master" for port in masters) or any(
            info.get("master_link_status") != "up"
            or info.get("master_port") != view[port][1]
            or view[port][1] not in masters
            for port, info in replicas.items()
        ):
            return False
        expected = 1 if len(live) == len(self.nodes) else None  # a master whose replica is down has none
        for port, info in masters.items():
            mine = [replica for replica in replicas.values() if replica["master_port"] == port]
            if len(mine) > 1 or (expected is not None and len(mine) != expected):
                return False
            if int(info["connected_slaves"]) != len(mine):
                return False
            if any(int(replica["slave_repl_offset"]) < int(info["master_repl_offset"]) for replica in mine):
                return False
        return True

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

    def logs(self, lines: int = 80) -> str:
        """The end of every node's log, for the report of a failed test."""
        live = {node.port for node in self.live_nodes()}
        return "\n".join(
            f"--- node 127.0.0.1:{node.port} ({'up' if node.port in live else 'down'})\n{node.server.log_tail(lines)}"
            for node in self.nodes
        )

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
