"""Through a shared cache (Varnish with its built-in VCL, Debian's varnishd): nothing per session is ever
served from the cache to another request; the versioned static files are."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from chatbot.app import create_app
from chatbot.web import WEB_ROOT, version
from tests.conftest import free_port, make_settings
from tests.sse import Event, SSEParser

pytestmark = pytest.mark.timeout(60)

VARNISHD = shutil.which("varnishd") or "/usr/sbin/varnishd"
# The tests' demo: 40 tokens at 40/s, so an answer is still streaming for a second.
DEMO = {"demo_tokens_per_second": 40.0, "demo_answer_tokens": 40}

if not os.path.exists(VARNISHD):
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs varnishd at {VARNISHD}; .ci/run installs Debian's varnish")
    pytest.skip(f"no varnishd at {VARNISHD}", allow_module_level=True)


@dataclass
class Varnish:
    """varnishd in the foreground with its built-in VCL, caching the one backend given."""

    backend_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workdir: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="chatbot-varnish-")
        os.chmod(self.workdir, 0o777)  # varnishd compiles its VCL as an unprivileged user
        self.proc = subprocess.Popen(
            [
                VARNISHD, "-F", "-n", self.workdir, "-a", f"127.0.0.1:{self.port}",
                "-b", f"127.0.0.1:{self.backend_port}", "-s", "malloc,32m",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
async def service(redis_url: str) -> AsyncIterator[TestServer]:
    server = TestServer(create_app(make_settings("redis", redis_url, **DEMO)), host="127.0.0.1", port=0)
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def varnish(service: TestServer) -> Iterator[Varnish]:
    assert service.port is not None
    cache = Varnish(service.port)
    cache.start()
    yield cache
    cache.stop()


@pytest.fixture
async def http(varnish: Varnish) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(varnish.url) as session:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with session.get("/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "varnishd did not come up"
            await asyncio.sleep(0.1)
        yield session


def cache_hit(resp: Any) -> bool:
    """Varnish's X-Varnish names two transactions on a hit: this request's and the cached object's."""
    return len(resp.headers.get("X-Varnish", "").split()) == 2


async def read_events(
    http: aiohttp.ClientSession, sid: str, last_event_id: str | None = None
) -> tuple[int, list[Event]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with http.get(f"/events/{sid}", headers=headers) as resp:
        parser = SSEParser()
        events = [event for chunk in [await resp.read()] for event in parser.feed(chunk)]
        assert not cache_hit(resp), "an event stream was served from the cache"
        return resp.status, events


async def create(http: aiohttp.ClientSession, message: str) -> str:
    async with http.post("/sessions", json={"message": message}) as resp:
        assert resp.status == 201
        sid: str = (await resp.json())["id"]
        return sid


async def test_a_fresh_tab_never_gets_another_tabs_204(http: aiohttp.ClientSession) -> None:
    sid = await create(http, "two tabs behind one cache")
    status, first = await read_events(http, sid)
    assert status == 200 and first[-1].type == "done"
    status, _ = await read_events(http, sid, last_event_id=first[-1].id)  # tab A reconnects after done
    assert status == 204
    for _ in range(2):  # tab B, fresh, reads the same URL without a Last-Event-ID
        status, fresh = await read_events(http, sid)
        assert status == 200
        assert [(e.id, e.data) for e in fresh] == [(e.id, e.data) for e in first]
    status, tail = await read_events(http, sid, last_event_id=first[1].id)
    assert status == 200 and [e.id for e in tail] == [e.id for e in first[2:]]


async def test_session_status_is_never_stale(http: aiohttp.ClientSession) -> None:
    sid = await create(http, "what is your status")
    async with http.get(f"/sessions/{sid}") as early:
        assert (await early.json())["status"] in ("queued", "streaming")
    _, events = await read_events(http, sid)
    async with http.get(f"/sessions/{sid}") as late:
        body = await late.json()
        assert not cache_hit(late)
        assert body["status"] == "done"
        assert body["text"] == "".join(e.json()["text"] for e in events if e.type == "token")
    async with http.get(f"/sessions/{sid}x") as unknown:  # a problem answer
        assert unknown.status == 404
    async with http.get(f"/sessions/{sid}x") as again:
        assert again.status == 404 and not cache_hit(again)


async def test_versioned_static_files_are_served_from_the_cache(http: aiohttp.ClientSession) -> None:
    path = f"/widget.js?v={version((WEB_ROOT / 'widget.js').read_bytes())}"
    async with http.get(path) as first:
        assert first.status == 200
        body = await first.read()
    async with http.get(path) as second:
        assert second.status == 200 and cache_hit(second), second.headers.get("X-Varnish")
        assert await second.read() == body
