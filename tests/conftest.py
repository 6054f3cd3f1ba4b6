"""Shared fixtures: a real redis-server, Settings for each store, and the real app served over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatbot import keys
from chatbot.providers import Provider
from chatbot.settings import Settings

if TYPE_CHECKING:
    from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DEFAULT_TIMEOUT = 60

# Fast demo answers: 40 tokens at 200/s take 0.2 s. The suite creates many sessions and streams from
# 127.0.0.1, so the per-client limits are lifted unless a test is about them.
FAST = {"demo_tokens_per_second": 200.0, "demo_answer_tokens": 40}
UNLIMITED = {"rate_limit": 0, "max_streams_per_address": 100_000, "shutdown_grace_seconds": 1.0}


def pytest_configure(config: pytest.Config) -> None:
    # The suite needs asyncio_mode=auto even before (or without) the project's ini choosing it.
    if config.getoption("asyncio_mode", None) is None:
        config.option.asyncio_mode = "auto"
    config.addinivalue_line("markers", "settings(**fields): override Settings fields for the app under test")
    config.addinivalue_line("markers", "cluster: runs on a Redis Cluster the tests start (select with -m cluster)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test has a timeout, even one whose module forgot to set it.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A test that failed on the Redis Cluster reports what its nodes logged: roles, syncs, failovers.
    report = yield
    cluster = getattr(item, "funcargs", {}).get("redis_cluster")
    if report.failed and cluster is not None:
        report.sections.append(("Redis Cluster node logs", cluster.logs()))
    return report


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throw-away redis-server process on a free loopback port; persistence only if asked for."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        extra: list[str] | None = None,
        log: bool = False,
        password: str | None = None,  # the default user's (requirepass)
    ) -> None:
        self.appendonly = appendonly
        self.password = password
        self.extra = extra or []
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="chatbot-redis-")
        # The server's log, kept across restarts, if asked for; otherwise it goes nowhere.
        self.log = Path(self._dir) / "redis.log" if log else None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                self._dir,
                "--maxclients",
                "4000",
                *(["--logfile", str(self.log)] if self.log else []),
                *self.extra,
                *(["--requirepass", password] if (password := self.password) else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING in time")
                time.sleep(0.05)  # a process start has no event to await
        finally:
            client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True)

    def log_tail(self, lines: int) -> str:
        """The last lines of the server's log, if it keeps one."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def restart(self, down_seconds: float = 0.0) -> None:
        """SHUTDOWN (which writes the append-only file, if any), stay down `down_seconds`, start on the same port."""
        assert self.proc is not None
        # The server closes the connection as it exits; without retries, or redis-py would spend seconds
        # reconnecting to a server that is gone, and the outage would last as long.
        no_retry = Retry(NoBackoff(), 0)
        with (
            redis.Redis(host="127.0.0.1", port=self.port, retry=no_retry) as client,
            contextlib.suppress(redis.ConnectionError),
        ):
            client.shutdown(nosave=True)
        self.proc.wait(timeout=10)
        time.sleep(down_seconds)  # an outage of a set length; callers in async tests use a thread
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared server's URL, with an empty database for this test."""
    with redis_server.client() as client:
        client.flushall()
    yield redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """One Redis Cluster (three masters, three replicas) for the whole run; tests that break it restore it."""
    from tests.cluster import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: Cluster) -> str:
    """Any node of the shared cluster, every master emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url


def make_settings(store: str, redis_url: str | None, **overrides: object) -> Settings:
    base = dataclasses.replace(Settings(), port=0, **FAST, **UNLIMITED)  # type: ignore[arg-type]
    if store in ("redis", "cluster"):
        base = dataclasses.replace(base, redis_url=redis_url)
    else:
        base = dataclasses.replace(base, redis_url=None)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(params=["redis", "embedded", pytest.param("cluster", marks=pytest.mark.cluster)])
def store(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "cluster" and "browser" in request.node.path.parts:
        pytest.skip("the browser tests run on one Redis; the cluster is tested over HTTP")
    return name


@pytest.fixture
def settings(request: pytest.FixtureRequest, store: str) -> Settings:
    """Settings for the store under test; a test overrides fields with @pytest.mark.settings(...).

    On one Redis, the URL names the app's connections (`client_name`), so that the real server can be asked
    whether the app under test is connected to it.
    """
    url = None
    if store == "redis":
        url = f"{request.getfixturevalue('redis_url')}?client_name={APP_CLIENT_NAME}"
    elif store == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
    marker = request.node.get_closest_marker("settings")
    overrides = dict(marker.kwargs) if marker else {}
    return make_settings(store, url, **overrides)


APP_CLIENT_NAME = "chatbot-app-under-test"


@pytest.fixture
def provider() -> Provider | None:
    """The app's provider; None means the one its settings name. A module overrides this fixture."""
    return None


class RealRedisWitness:
    """Proves, from a separate client of the real redis-server, that the app under test uses that server.

    Each session created over HTTP must be visible there at once (its meta hash), and the app must hold
    connections named `APP_CLIENT_NAME`: an app that silently fell back to the embedded store fails both.
    """

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.created: list[str] = []
        self.missing: list[str] = []

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "POST" and request.path == "/sessions" and response.status == 201:
            session_id = response.headers["Location"].rsplit("/", 1)[-1]
            self.created.append(session_id)
            if not await self._redis.exists(keys.meta(session_id)):
                self.missing.append(session_id)

    async def check(self) -> None:
        try:
            named = [c for c in await self._redis.client_list() if c.get("name") == APP_CLIENT_NAME]
        finally:
            await self._redis.aclose()
        assert not self.missing, f"sessions created over HTTP but absent from the real Redis: {self.missing}"
        assert named, "the app under test holds no connection to the real redis-server (embedded store?)"


@pytest_asyncio.fixture
async def client(
    request: pytest.FixtureRequest, settings: Settings, store: str, provider: Provider | None
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    from chatbot.app import create_app

    app = create_app(settings, provider=provider)
    witness = RealRedisWitness(request.getfixturevalue("redis_url")) if store == "redis" else None
    if witness is not None:
        app.on_response_prepare.append(witness.on_response_prepare)
    test_client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await test_client.start_server()
    try:
        yield test_client
        if witness is not None:
            await witness.check()
    finally:
        await close_promptly(test_client)


SHUTDOWN_SECONDS = 10.0


async def close_promptly(test_client: TestClient[web.Request, web.Application]) -> None:
    """Close the client and server; an app whose cleanup hangs fails here instead of at the test timeout."""
    # not asyncio.timeout: a cleanup that swallows its own cancellation would hang that too
    closing = asyncio.create_task(test_client.close())
    done, _ = await asyncio.wait([closing], timeout=SHUTDOWN_SECONDS)
    if not done:
        _ABANDONED.append(closing)
        raise AssertionError(f"the app did not shut down within {SHUTDOWN_SECONDS} s (its cleanup hangs)")
    closing.result()


_ABANDONED: list[asyncio.Task[None]] = []


def serve_env(port: int, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        CHATBOT_HOST="127.0.0.1",
        CHATBOT_PORT=str(port),
        CHATBOT_REDIS_URL=redis_url,
        CHATBOT_RATE_LIMIT="0",
        CHATBOT_MAX_STREAMS_PER_ADDRESS="100000",
        CHATBOT_SHUTDOWN_GRACE_SECONDS="1",
    )
    env.update(extra)
    return env
