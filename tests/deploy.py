"""What `docker compose up` runs, run natively: redis-server, `chatbot serve` instances and nginx.

The API command and its environment are read from docker-compose.yml, and nginx runs the repo's
deploy/nginx/chatbot.conf.template as is (only ${NGINX_PORT} filled in, as the nginx image does).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import ROOT, RedisServer, free_port
from tests.sse import Event, SSEParser

COMPOSE = ROOT / "docker-compose.yml"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "chatbot.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def envsubst(template: str, variables: Mapping[str, str]) -> str:
    """What the nginx image does to its templates: replace only the variables it was given."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables[name] if name in variables else match.group(0)

    return _VARIABLE.sub(replace, template)


def api_command() -> list[str]:
    """The compose file's API command, with `chatbot` resolved to this environment's script."""
    command: list[str] = list(compose()["services"]["api"]["command"])
    script = Path(sys.executable).with_name(command[0])
    return [str(script) if script.exists() else command[0], *command[1:]]


def api_environment() -> dict[str, str]:
    """The compose file's API environment, interpolated with its defaults (no .env in tests)."""
    env = {}
    for name, value in compose()["services"]["api"]["environment"].items():
        env[name] = _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))
    return env


@dataclass
class Instance:
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "the instance was never started"
        return self.proc

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                api_command(), cwd=str(ROOT), env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"exited:\n{self.tail()}"
            try:
                async with http.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"instance on {self.port} not ready:\n{self.tail()}"
            await asyncio.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM, as a deployment would; SIGKILL if it has not exited within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Nginx:
    port: int
    upstreams: list[int]
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chatbot-nginx-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        d = self.directory
        os.chmod(d, 0o777)  # nginx's workers run as nobody and write their temp files here
        (d / "chatbot.conf").write_text(envsubst(NGINX_TEMPLATE.read_text(), {"NGINX_PORT": f"127.0.0.1:{self.port}"}))
        servers = "".join(f"    server 127.0.0.1:{port} max_fails=0;\n" for port in self.upstreams)
        (d / "upstream.conf").write_text(f"upstream chatbot_api {{\n{servers}    keepalive 32;\n}}\n")
        temp = " ".join(
            f"{kind}_temp_path {d / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (d / "nginx.conf").write_text(
            f"worker_processes 1;\npid {d / 'nginx.pid'};\nerror_log {d / 'error.log'} warn;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\n  access_log off;\n  {temp}\n"
            f"  include {d / 'upstream.conf'};\n  include {d / 'chatbot.conf'};\n}}\n"
        )
        with (d / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )

    def errors(self) -> str:
        return "".join(
            (self.directory / name).read_text()
            for name in ("stderr.log", "error.log")
            if (self.directory / name).exists()
        )

    async def wait_ready(self, http: aiohttp.ClientSession, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.errors()
            try:
                async with http.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "nginx did not come up"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Cluster:
    """One Redis, N instances, nginx in front."""

    redis: RedisServer
    instances: list[Instance]
    nginx: Nginx

    @classmethod
    def build(cls, redis: RedisServer, count: int, logs: Path, **settings: str) -> Cluster:
        instances = []
        for i in range(count):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATBOT_", "OPENAI_", "ANTHROPIC_"))}
            env.update({k: v for k, v in api_environment().items() if v})
            env.update(
                CHATBOT_HOST="127.0.0.1",
                CHATBOT_PORT=str(port),
                CHATBOT_REDIS_URL=redis.url,
                CHATBOT_TRUSTED_PROXIES="127.0.0.1",
                CHATBOT_LOG_FORMAT="plain",
                PYTHONPATH=str(ROOT),
            )
            env.update(settings)
            instances.append(Instance(port, logs / f"api-{i}.log", env))
        return cls(redis, instances, Nginx(free_port(), [inst.port for inst in instances]))

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start every instance, then nginx; if any of it fails, stop what started (no orphaned servers)."""
        try:
            for instance in self.instances:
                instance.start()
            for instance in self.instances:
                await instance.wait_ready(http)
            self.nginx.start()
            await self.nginx.wait_ready(http)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.nginx.stop()
        for instance in self.instances:
            instance.stop()


@dataclass
class Follower:
    """Reads a session's events the way a browser's EventSource does: reconnect with Last-Event-ID."""

    base: str
    session_id: str
    events: list[Event] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    connections: int = 0
    retry_s: float = 0.1
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_events(self, count: int) -> None:
        while len(self.events) < count:
            self.progress.clear()
            await self.progress.wait()

    async def run(self, http: aiohttp.ClientSession, *, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            headers = {"Last-Event-ID": self.events[-1].id or ""} if self.events else {}
            try:
                async with http.get(f"{self.base}/events/{self.session_id}", headers=headers) as resp:
                    self.connections += 1
                    if resp.status == 204:
                        return
                    if resp.status in (502, 503, 504):
                        await asyncio.sleep(self.retry_s)
                        continue
                    assert resp.status == 200, f"{resp.status}: {await resp.text()}"
                    parser = SSEParser()
                    async for chunk in resp.content.iter_any():
                        for event in parser.feed(chunk):
                            self.events.append(event)
                            self.arrivals.append(time.monotonic())
                            self.progress.set()
                            if event.type in ("done", "error"):
                                return
            except (aiohttp.ClientError, ConnectionError):
                pass
            await asyncio.sleep(self.retry_s)  # the stream ended without a terminal event: reconnect
        raise AssertionError(f"session {self.session_id} did not end within {deadline_s}s")
