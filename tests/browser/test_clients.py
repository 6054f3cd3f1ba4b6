"""The client matrix: Chromium's EventSource and npm's `eventsource` (both running README's snippet as
written), httpx-sse and sseclient-py each read answers across cut connections, through the project's nginx
with the API instance restarted mid-answer, during a Redis outage, and over a stream cap.

Each must end with the model's whole answer exactly once, named events only, no phantom (empty or
data-less) events, and no reconnect after the terminal event.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatbot.providers.demo import demo_answer
from tests.browser.conftest import ScriptedProvider, StartService
from tests.browser.cutting_proxy import LAST_EVENT_ID_HEADER, CuttingProxy
from tests.clients.readers import (
    NAMED,
    Reading,
    follow_chromium,
    follow_httpx_sse,
    follow_node_eventsource,
    follow_sseclient,
    node_client_missing,
)
from tests.conftest import RedisServer
from tests.deploy import Cluster
from tests.helpers import assert_come_back

pytestmark = pytest.mark.timeout(120)

CLIENTS = ("chromium", "npm eventsource", "httpx-sse", "sseclient-py")
TOKENS = 60
SERVICE = {"demo_tokens_per_second": 30.0, "demo_answer_tokens": TOKENS, "sse_retry_ms": 100}

MakeProxy = Callable[..., Awaitable[CuttingProxy]]
ANY_MESSAGE = "The answer can no longer be read."  # the README snippet's own words


@pytest.fixture
def node_ready() -> None:
    """In CI (CI=true) a missing npm client is a failure, so that a green run always includes it."""
    missing = node_client_missing()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI needs the npm client: {missing} (.ci/run installs it)")
    if missing:
        pytest.skip(missing)


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    proxies: list[CuttingProxy] = []

    async def make(target_port: int, *, cut_after: float | None) -> CuttingProxy:
        proxy = CuttingProxy(target_port, cut_after=cut_after)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


async def create(base: str, message: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(f"{base}/sessions", json={"message": message}) as resp:
        assert resp.status == 201, await resp.text()
        session_id: str = (await resp.json())["id"]
        return session_id


async def read_with_every_client(
    browser: Any, make_proxy: MakeProxy, target_port: int, session_id: str, *, cut_after: float | None
) -> dict[str, tuple[Reading, CuttingProxy]]:
    """Each client reads the session through a proxy of its own (which records its requests)."""
    proxies = {name: await make_proxy(target_port, cut_after=cut_after) for name in CLIENTS}
    path = f"/events/{session_id}"

    def url(name: str) -> str:
        return f"http://127.0.0.1:{proxies[name].port}{path}"

    readings = await asyncio.gather(
        follow_chromium(browser, f"http://127.0.0.1:{proxies['chromium'].port}", path),
        follow_node_eventsource(url("npm eventsource")),
        follow_httpx_sse(url("httpx-sse")),
        follow_sseclient(url("sseclient-py")),
    )
    return {reading.client: (reading, proxies[name]) for name, reading in zip(CLIENTS, readings, strict=True)}


def assert_whole_once(reading: Reading, proxy: CuttingProxy, expected: str) -> None:
    who = reading.client
    assert reading.end == "terminal", f"{who} ended {reading.end!r} after {len(reading.events)} events"
    for event in reading.events:
        assert event.type in NAMED, f"{who} dispatched a {event.type!r} event: {event}"
        assert event.data, f"{who} dispatched an event without data (a phantom): {event}"
        assert isinstance(json.loads(event.data), dict), f"{who}: {event}"
    ids = [tuple(int(part) for part in event.id.split("-")) for event in reading.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), f"{who} saw an event twice or out of order"
    terminal = [event for event in reading.events if event.type in ("done", "error")]
    assert terminal == reading.events[-1:], f"{who}: terminal events {terminal}"
    assert terminal[0].type == "done" and json.loads(terminal[0].data)["finish_reason"] == "stop", terminal[0]
    assert reading.token_text() == expected, f"{who} got another text than the model's"
    if who in ("Chromium EventSource", "npm eventsource"):  # what the README snippet's own code put together
        assert reading.text == expected, f"{who}'s snippet assembled another text: {reading.text[:80]!r}"
    after_terminal = LAST_EVENT_ID_HEADER + b" " + terminal[0].id.encode()
    reconnects = [r for r in proxy.events_requests if after_terminal in r.lower()]
    assert not reconnects, f"{who} reconnected after the terminal event"


def assert_matrix(results: dict[str, tuple[Reading, CuttingProxy]], message: str) -> None:
    expected = "".join(demo_answer(message, TOKENS))
    failures = []
    for reading, proxy in results.values():
        try:
            assert_whole_once(reading, proxy, expected)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


async def metric(base: str, name: str, **labels: str) -> float:
    from tests.helpers import metric_value

    async with aiohttp.ClientSession(base) as http:
        return await metric_value(http, name, **labels)


# --- the scenarios -------------------------------------------------------------------------------------------


async def test_every_client_reads_whole_answers_across_cut_connections(
    start_service: StartService, browser: Any, make_proxy: MakeProxy, node_ready: None
) -> None:
    service = await start_service(**SERVICE)
    message = "Cut my connection while you answer"
    session_id = await create(service.url("").rstrip("/"), message)
    results = await read_with_every_client(browser, make_proxy, service.server.port or 0, session_id, cut_after=0.3)
    assert_matrix(results, message)
    for reading, proxy in results.values():
        assert proxy.cuts >= 2 and reading.connections >= 2, f"{reading.client} was never cut: the test tested nothing"


async def test_every_client_reads_whole_answers_over_a_stream_cap(
    start_service: StartService, browser: Any, make_proxy: MakeProxy, node_ready: None
) -> None:
    service = await start_service(**SERVICE, max_streams_per_address=2, rate_limit=0)
    base = service.url("").rstrip("/")
    message = "Four tabs, two streams allowed"
    session_id = await create(base, message)
    results = await read_with_every_client(browser, make_proxy, service.server.port or 0, session_id, cut_after=None)
    assert_matrix(results, message)
    assert await metric(base, "chatbot_events_retry_answers_total", reason="streams_per_address") >= 1


async def test_every_client_reads_whole_answers_across_a_redis_outage(
    start_service: StartService, browser: Any, make_proxy: MakeProxy, node_ready: None
) -> None:
    with RedisServer(appendonly=True) as redis_server:
        service = await start_service(**SERVICE, redis_url=redis_server.url, rate_limit=0)
        base = service.url("").rstrip("/")
        message = "Keep going while Redis is away"
        session_id = await create(base, message)

        async def outage() -> None:
            await asyncio.sleep(0.6)
            redis_server.stop()  # killed; its append-only file keeps what was written
            await asyncio.sleep(2.5)
            await asyncio.to_thread(redis_server.start)

        # Cuts make the clients reconnect during the outage, which is when a 503 used to stop them for good.
        reading, _ = await asyncio.gather(
            read_with_every_client(browser, make_proxy, service.server.port or 0, session_id, cut_after=0.4),
            outage(),
        )
        assert_matrix(reading, message)
        # A request in the outage either waits for a pooled connection until Redis is back or is told to
        # come back (tests/test_events_answers.py); never a status that ends an EventSource.
        for result, proxy in reading.values():
            assert len(proxy.events_requests) >= 2, f"{result.client} never reconnected: the outage was not tested"


async def test_every_client_reads_whole_answers_through_nginx_with_the_instance_restarted(
    redis_server: RedisServer, tmp_path: Path, browser: Any, make_proxy: MakeProxy, node_ready: None
) -> None:
    cluster = Cluster.build(
        redis_server, 1, tmp_path,
        CHATBOT_DEMO_TOKENS_PER_SECOND="20", CHATBOT_DEMO_ANSWER_TOKENS=str(TOKENS), CHATBOT_SSE_RETRY_MS="100",
        CHATBOT_SHUTDOWN_GRACE_SECONDS="20", CHATBOT_RATE_LIMIT="0",
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        await cluster.start(http)
        try:
            base, instance = cluster.nginx.url, cluster.instances[0]
            message = "Restart the only instance mid-answer"
            session_id = await create(base, message)

            async def restart() -> None:
                await asyncio.sleep(1.0)
                instance.signal(signal.SIGTERM)  # it finishes the answer, ends its streams, exits
                assert await asyncio.to_thread(instance.wait_exit, 40) == 0, instance.tail()
                async with http.get(f"{base}/events/{session_id}", headers={"Last-Event-ID": "1-0"}) as down:
                    await assert_come_back(down, "upstream_unavailable", 1.0, jitter=1.0)
                await asyncio.sleep(0.5)
                instance.start()
                await instance.wait_ready(http)

            started = time.monotonic()
            results, _ = await asyncio.gather(
                read_with_every_client(browser, make_proxy, cluster.nginx.port, session_id, cut_after=0.4), restart()
            )
            assert_matrix(results, message)
            assert time.monotonic() - started < 60
        finally:
            cluster.stop()


# --- README's snippet: the server's `error` event beside EventSource's own ---------------------------------


async def test_readme_snippet_tells_the_servers_error_from_its_own(
    start_service: StartService, browser: Any, make_proxy: MakeProxy
) -> None:
    answer = "A model that fails half-way through this answer."
    service = await start_service(provider=ScriptedProvider({"fail": answer}, failures=1), sse_retry_ms=100)
    base = service.url("").rstrip("/")
    proxy = await make_proxy(service.server.port or 0, cut_after=0.3)  # its own errors too, on every cut
    proxy_base = f"http://127.0.0.1:{proxy.port}"
    failed = await create(base, "fail")
    reading = await follow_chromium(browser, proxy_base, f"/events/{failed}")
    # Called once, for the server's terminal `error`, with its data; never for the cuts.
    assert [how for how, _ in reading.callbacks] == ["error"], reading.callbacks
    assert reading.callbacks[0][1]["code"] == "upstream_overloaded" and reading.callbacks[0][1]["retryable"] is True
    assert reading.events[-1].type == "error"
    terminal = LAST_EVENT_ID_HEADER + b" " + reading.events[-1].id.encode()
    assert not [r for r in proxy.events_requests if terminal in r.lower()], "it reconnected after the error"
    # EventSource's own final error: an unknown session (404), and a resume after the terminal event (204).
    unknown = await follow_chromium(browser, proxy_base, "/events/AAAAAAAAAAAAAAAAAAAAAA")
    assert unknown.callbacks == [("error", {"code": "stream_closed", "message": ANY_MESSAGE, "retryable": False})]
    after_end = await follow_chromium(browser, proxy_base, f"/events/{failed}?last_event_id={reading.events[-1].id}")
    assert [payload["code"] for _, payload in after_end.callbacks] == ["stream_closed"]
    assert after_end.events == []
