"""The processes the benchmark starts and what it reads from them: redis-server, the fake upstream, the
service (`python -m chatbot serve`) or the baseline, each pinned to its core and stopped by the harness."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NOFILE = 65536  # 10,000 streams: a socket each to the client, plus upstream and (baseline) Redis sockets
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Cores:
    """The service gets one core, everything else (load generator, upstream, Redis) the other."""

    service: set[int]
    load: set[int]

    @classmethod
    def pick(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(set(cpus), set(cpus))
        return cls({cpus[0]}, set(cpus[1:]))


def raise_nofile() -> int:
    """Lift this process's open-file limit as far as allowed (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(NOFILE, hard), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
    return soft


def _child_setup(cores: set[int]) -> None:
    raise_nofile()
    os.sched_setaffinity(0, cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    redis_version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout.split()[2]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "redis": redis_version.removeprefix("v="),
    }


class Proc:
    """A child process pinned to `cores`, with its output in a log file under `out`."""

    def __init__(self, name: str, argv: list[str], *, cores: set[int], out: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = out / f"{name}.log"
        self._log = open(self.log, "ab")  # noqa: SIM115  closed in stop()
        self.popen = subprocess.Popen(
            argv, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            preexec_fn=lambda: _child_setup(cores), cwd=ROOT,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """utime + stime from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def file_limit(self) -> int:
        with open(f"/proc/{self.pid}/limits") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        return int(line.split()[3])

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()


class RedisServer(Proc):
    """redis-server on a free loopback port, no persistence, enough clients for the baseline."""

    def __init__(self, *, cores: set[int], out: Path, name: str = "redis", extra: list[str] | None = None) -> None:
        self.port = free_port()
        while extra and self.port + 10000 > 65535:  # a cluster node also listens on port + 10000
            self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="chatbot-bench-redis-")
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", self._dir, "--maxclients", "50000", "--protected-mode", "no", *(extra or [])]
        super().__init__(name, argv, cores=cores, out=out, env={})
        self.client = redis.Redis(port=self.port, decode_responses=True, socket_connect_timeout=1)
        wait_until(self._ping, what="redis-server PING")
        self.client.client_setname("bench")

    def _ping(self) -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return bool(self.client.ping())
        return False

    def commands(self) -> dict[str, int]:
        """Calls per command since start (INFO commandstats), including those run inside Lua scripts."""
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def command_usec(self) -> dict[str, int]:
        """Redis's own µs per command since start (INFO commandstats; a script's commands count in the
        script's `evalsha` too)."""
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["usec"]) for name, value in stats.items()}

    def service_connections(self) -> int:
        """Connections other than the harness's own (which are named `bench`)."""
        clients = self.client.client_list()
        return sum(1 for c in clients if c.get("name") != "bench")

    def flush(self) -> None:
        self.client.flushall()

    def stop(self, timeout: float = 15.0) -> None:
        self.client.close()
        super().stop(timeout)
        shutil.rmtree(self._dir, ignore_errors=True)


class RedisCluster:
    """A Redis Cluster of `masters` redis-servers (no replicas), each like RedisServer, joined by redis-cli.

    Reads like one RedisServer to the scenarios: commands and CPU are summed over the nodes.
    """

    def __init__(self, *, cores: set[int], out: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(masters):
                extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                self.nodes.append(RedisServer(cores=cores, out=out, name=f"redis-cluster-{i}", extra=extra))
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
            )  # fmt: skip
            wait_until(self._healthy, what="the cluster to cover every slot")
        except BaseException:
            self.stop()
            raise
        self.url = self.nodes[0].url
        self.name = "redis-cluster"

    def _healthy(self) -> bool:
        return all(n.client.cluster("info")["cluster_state"] == "ok" for n in self.nodes)

    def cpu_seconds(self) -> float:
        return sum(n.cpu_seconds() for n in self.nodes)

    def commands(self) -> dict[str, int]:
        return self._summed(RedisServer.commands)

    def command_usec(self) -> dict[str, int]:
        return self._summed(RedisServer.command_usec)

    def _summed(self, per_node: Callable[[RedisServer], dict[str, int]]) -> dict[str, int]:
        """A per-command figure of every node, added up by command."""
        total: Counter[str] = Counter()
        for node in self.nodes:
            total.update(per_node(node))  # update adds, and keeps a command that counted 0
        return dict(total)

    def service_connections(self) -> int:
        return sum(n.service_connections() for n in self.nodes)

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.stop(timeout)


class Upstream(Proc):
    """The paced fake OpenAI upstream (bench/upstream.py)."""

    def __init__(self, *, cores: set[int], out: Path) -> None:
        super().__init__("upstream", [sys.executable, "-m", "bench.upstream"], cores=cores, out=out, env=_pythonpath())
        assert self.popen.stdout is not None
        self.url = self.popen.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the fake upstream did not start; see {self.log}")


class Server(Proc):
    """The service, the baseline or the floor (the baseline with no store), serving on a free port."""

    def __init__(
        self,
        kind: str,
        *,
        cores: set[int],
        out: Path,
        redis_url: str,
        upstream: str,
        traced: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        entry: str = "chatbot",
    ) -> None:
        """`entry`: the module the service runs as (`chatbot serve`, or `bench.inprocess_serve`)."""
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "service" and traced is not None:
            argv = [sys.executable, "-m", "bench.traced_serve"]
            env = {**_pythonpath(), **service_env(self.port, redis_url, upstream), "BENCH_SNAPSHOT_DIR": str(traced)}
        elif kind == "service":
            argv = [sys.executable, "-m", entry, *(["serve"] if entry == "chatbot" else [])]
            env = {**_pythonpath(), **service_env(self.port, redis_url, upstream)}
        else:
            argv = [sys.executable, "-m", "bench.baseline", "--port", str(self.port), "--redis", redis_url]
            argv += ["--upstream", upstream + "/v1", "--store", "memory" if kind == "floor" else "redis"]
            env = _pythonpath()
        if kind == "service":
            env.update(extra_env or {})
        super().__init__(kind, argv, cores=cores, out=out, env=env)
        wait_until(self._ready, what=f"{kind} /readyz", proc=self)

    def _ready(self) -> bool:
        import urllib.request

        with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/readyz", timeout=1) as reply:
            return bool(reply.status == 200)
        return False


def service_env(port: int, redis_url: str, upstream: str) -> dict[str, str]:
    """`chatbot serve` against the fake upstream, with the per-client caps lifted (one client address here)."""
    return {
        "CHATBOT_PORT": str(port),
        "CHATBOT_REDIS_URL": redis_url,
        "CHATBOT_PROVIDER": "openai",
        "CHATBOT_MODEL": "fake-model",
        "OPENAI_API_KEY": "bench",
        "OPENAI_BASE_URL": upstream + "/v1",
        "CHATBOT_UPSTREAM_MAX_RETRIES": "0",
        "CHATBOT_RATE_LIMIT": "0",
        "CHATBOT_MAX_STREAMS_PER_ADDRESS": "1000000",
        "CHATBOT_MAX_STREAMS": "1000000",
        "CHATBOT_LOG_FORMAT": "plain",
    }


def _pythonpath() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def wait_until(check: object, *, what: str, proc: Proc | None = None, timeout: float = 20.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)  # a process start has no event to await


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
