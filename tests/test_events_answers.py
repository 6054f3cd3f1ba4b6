"""What /events/ answers besides a stream, what may be cached, and clients that leave early (issue 10)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatbot import keys
from chatbot.app import create_app
from chatbot.appkeys import HUB, PRODUCERS, STORE
from chatbot.web import WEB_ROOT, version
from tests.conftest import RedisServer, close_promptly, make_settings
from tests.helpers import (
    assert_come_back,
    assert_problem,
    create_session,
    first_event,
    get_session,
    metric_value,
    read_stream,
    wait_terminal,
)
from tests.oracle import expected_text, pause_writes

pytestmark = pytest.mark.timeout(60)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
SLOW = {"demo_tokens_per_second": 10.0, "demo_answer_tokens": 300}  # 30 s: live for the whole test


@pytest.fixture
async def make_client(redis_url: str) -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(url: str | None = None, **overrides: Any) -> Client:
        client: Client = TestClient(TestServer(create_app(make_settings("redis", url or redis_url, **overrides))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await close_promptly(client)


# --- conditions that pass: 200 with retry:, so that an EventSource comes back ---------------------------


async def test_per_address_cap_answers_retry_and_frees_on_close(make_client: MakeClient) -> None:
    client = await make_client(max_streams_per_address=2, **SLOW)
    sid = (await create_session(client))["id"]
    tabs = [await client.get(f"/events/{sid}") for _ in range(2)]
    assert [tab.status for tab in tabs] == [200, 200]
    async with client.get(f"/events/{sid}") as third:
        await assert_come_back(third, "streams_per_address", 5.0)
    assert await metric_value(client, "chatbot_events_retry_answers_total", reason="streams_per_address") == 1
    tabs[0].close()
    deadline = time.monotonic() + 5
    while await metric_value(client, "chatbot_open_streams") != 1:
        assert time.monotonic() < deadline, "a closed stream still holds its slot"
        await asyncio.sleep(0.05)
    event = await first_event(client, sid)  # the third tab, coming back, now gets the answer
    assert event.type == "token"
    tabs[1].close()


async def test_per_instance_cap_answers_retry(make_client: MakeClient) -> None:
    client = await make_client(max_streams=1, **SLOW)
    sid = (await create_session(client))["id"]
    async with client.get(f"/events/{sid}") as held:
        assert held.status == 200
        async with client.get(f"/events/{sid}", headers={"Last-Event-ID": "1-0"}) as refused:
            await assert_come_back(refused, "streams_per_instance", 1.0)


async def test_store_outage_answers_retry_then_the_stream_resumes() -> None:
    with RedisServer(appendonly=True) as server:
        client: Client = TestClient(TestServer(create_app(make_settings("redis", server.url, **SLOW))))
        await client.start_server()
        try:
            sid = (await create_session(client))["id"]
            seen = await first_event(client, sid)
            server.stop()
            retries = set()
            for _ in range(3):
                async with client.get(f"/events/{sid}", headers={"Last-Event-ID": seen.id or ""}) as resp:
                    retries.add(await assert_come_back(resp, "store_unavailable", 1.0))
            assert len(retries) > 1, "no jitter: every client would come back at the same moment"
            server.start()
            deadline = time.monotonic() + 10
            while True:
                async with client.get(f"/events/{sid}", headers={"Last-Event-ID": seen.id or ""}) as resp:
                    body = await resp.content.read(200)
                    assert resp.status == 200
                    if not body.startswith(b": store_unavailable"):
                        assert body.startswith(b"retry: ")
                        break
                assert time.monotonic() < deadline, "the stream did not come back with Redis"
                await asyncio.sleep(0.2)
        finally:
            await close_promptly(client)


async def test_draining_instance_answers_retry_and_closes(make_client: MakeClient) -> None:
    client = await make_client(**SLOW)
    sid = (await create_session(client))["id"]
    client.app[HUB].end_streams()  # what SIGTERM does once the answers in flight are finished
    async with client.get(f"/events/{sid}") as resp:
        assert resp.headers.get("Connection", "").lower() == "close"
        await assert_come_back(resp, "draining", 1.0)


async def test_an_answer_posted_as_the_drain_begins_is_finished_not_cut(
    make_client: MakeClient, redis_url: str
) -> None:
    """A POST that passed the `accepting` check, then waited on Redis while SIGTERM's drain began, still gets
    its answer finished: the drain waits for producers that start while it waits (a rolling restart once
    cut such an answer with `server_shutdown`)."""
    client = await make_client(demo_tokens_per_second=200.0, demo_answer_tokens=40, shutdown_grace_seconds=10.0)
    await pause_writes(redis_url, 0.3)  # the POST's create_session waits behind this
    posting = asyncio.create_task(create_session(client, "Posted just in time"))
    await asyncio.sleep(0.1)
    await client.app[PRODUCERS].drain(10.0)
    sid = (await posting)["id"]
    state = await get_session(client, sid)
    assert state["status"] == "done", state
    assert state["text"] == expected_text("Posted just in time", 40)


# --- final conditions keep their status ----------------------------------------------------------------


async def test_final_conditions_keep_their_status_and_are_not_stored(make_client: MakeClient) -> None:
    client = await make_client()
    sid = (await create_session(client))["id"]
    events = (await wait_terminal(client, sid)).events
    other = (await create_session(client))["id"]
    other_events = (await wait_terminal(client, other)).events
    cases: list[tuple[dict[str, str], str, int]] = [
        ({}, f"/events/{secrets.token_urlsafe(16)}", 404),
        ({}, "/events/not-an-id", 404),
        ({"Last-Event-ID": "yesterday"}, f"/events/{sid}", 400),
        ({"Last-Event-ID": other_events[1].id or ""}, f"/events/{sid}", 409),
    ]
    for headers, path, status in cases:
        async with client.get(path, headers=headers) as resp:
            await assert_problem(resp, status)
            assert resp.headers["Cache-Control"] == "no-store", (path, status)
    async with client.get(f"/events/{sid}", headers={"Last-Event-ID": events[-1].id or ""}) as done:
        assert done.status == 204
        assert done.headers["Cache-Control"] == "no-store"


async def test_a_session_produced_here_is_served_and_one_whose_record_vanished_is_unknown(
    make_client: MakeClient, redis_url: str
) -> None:
    """A GET for a session this instance generates reads the session's record with its backlog, in one
    round trip, instead of looking it up first. A record that vanished meanwhile (a store that restarted
    empty) must still answer 404, with or without Last-Event-ID, never an empty stream."""
    client = await make_client(demo_tokens_per_second=0.2, demo_answer_tokens=3)  # first token after 5 s
    sid = (await create_session(client))["id"]
    store = client.app[STORE]
    async with client.get(f"/events/{sid}") as live:
        assert live.status == 200
        assert (await live.content.readline()).startswith(b"retry:")
    with redis.Redis.from_url(redis_url) as r:
        r.delete(keys.meta(sid), keys.stream(sid))
    assert store.producing(sid), "the producer appended meanwhile: the path under test was not taken"
    for headers in ({}, {"Last-Event-ID": "1-0"}):
        async with client.get(f"/events/{sid}", headers=headers) as gone:
            await assert_problem(gone, 404)
    assert store.producing(sid)
    assert await metric_value(client, "chatbot_open_streams") == 0


# --- HEAD ------------------------------------------------------------------------------------------------


def _redis_calls(server_url: str, command: str) -> int:
    with redis.Redis.from_url(server_url) as r:
        stats: dict[str, Any] = r.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_head_answers_the_headers_of_a_get_without_subscribing_or_reading(
    make_client: MakeClient, redis_url: str
) -> None:
    client = await make_client(max_streams_per_address=1, **SLOW)
    sid = (await create_session(client))["id"]
    get = await client.get(f"/events/{sid}")  # holds the one slot this address has
    assert get.status == 200
    xrange_before, subscribe_before = _redis_calls(redis_url, "xrange"), _redis_calls(redis_url, "subscribe")
    for _ in range(3):
        async with client.head(f"/events/{sid}") as head:
            assert head.status == 200
            for name in ("Content-Type", "Cache-Control", "X-Accel-Buffering"):
                assert head.headers.get(name) == get.headers.get(name), name
            assert await head.read() == b""
    assert _redis_calls(redis_url, "xrange") == xrange_before, "HEAD read the stream"
    assert _redis_calls(redis_url, "subscribe") == subscribe_before, "HEAD subscribed"
    assert await metric_value(client, "chatbot_open_streams") == 1, "HEAD held a stream"
    get.close()
    async with client.head(f"/events/{secrets.token_urlsafe(16)}") as unknown:
        assert unknown.status == 404 and unknown.headers["Cache-Control"] == "no-store"
    async with client.head(f"/events/{sid}", headers={"Last-Event-ID": "nope"}) as bad:
        assert bad.status == 400


async def test_head_after_the_terminal_event_is_204(make_client: MakeClient) -> None:
    client = await make_client()
    sid = (await create_session(client))["id"]
    last = (await wait_terminal(client, sid)).events[-1]
    async with client.head(f"/events/{sid}", headers={"Last-Event-ID": last.id or ""}) as head:
        assert head.status == 204


# --- Cache-Control ---------------------------------------------------------------------------------------


async def test_everything_per_session_and_every_problem_is_no_store(make_client: MakeClient) -> None:
    client = await make_client(**SLOW)
    created = await client.post("/sessions", json={"message": "cache me"})
    assert created.status == 201 and created.headers["Cache-Control"] == "no-store"
    sid = (await created.json())["id"]
    answers = [
        await client.get(f"/sessions/{sid}"),
        await client.post(f"/sessions/{sid}/cancel"),
        await client.post("/sessions", data="{", headers={"Content-Type": "application/json"}),
        await client.post("/sessions", data="x", headers={"Content-Type": "text/plain"}),
        await client.post("/sessions", json={"message": ""}),
        await client.get("/no/such/route"),
        await client.get("/healthz"),
        await client.get("/readyz"),
        await client.get("/metrics"),
    ]
    for resp in answers:
        assert resp.headers.get("Cache-Control") == "no-store", (resp.method, resp.url.path, resp.status)
        resp.close()
    stream = await read_stream(client, sid)
    assert stream.status == 200 and stream.headers["Cache-Control"] == "no-store"


async def test_static_files_are_cacheable_and_versioned(make_client: MakeClient) -> None:
    client = await make_client()
    current = version((WEB_ROOT / "widget.js").read_bytes())
    page = await client.get("/")
    html = await page.text()
    assert f'src="/widget.js?v={current}"' in html
    for path in re.findall(r'(?:src|href)="(/[^"]+\?v=[0-9a-f]+)"', html):
        async with client.get(path) as pinned:
            assert pinned.status == 200, path
            assert pinned.headers["Cache-Control"] == "public, max-age=31536000, immutable", path
    async with client.get("/widget.js") as plain:
        assert plain.headers["Cache-Control"] == "no-cache" and plain.headers.get("ETag")
        etag = plain.headers["ETag"]
    async with client.get("/widget.js", headers={"If-None-Match": etag}) as again:
        assert again.status == 304
    async with client.get("/widget.js?v=0123456789abcdef") as stale:
        assert stale.status == 200 and stale.headers["Cache-Control"] == "no-cache"
    assert page.headers["Cache-Control"] == "no-cache"
    async with client.get("/", headers={"If-None-Match": page.headers["ETag"]}) as revalidated:
        assert revalidated.status == 304


# --- clients that leave early ----------------------------------------------------------------------------


def _connect_and_reset(port: int, request: bytes, wait_s: float) -> None:
    """Send a request and reset the connection (SO_LINGER 0) after `wait_s`, as a closed tab does."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(request)
        if wait_s:
            time.sleep(wait_s)


async def test_clients_leaving_early_are_counted_not_logged_as_errors(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(**SLOW)
    sid = (await create_session(client))["id"]
    port = client.server.port
    assert port is not None
    caplog.set_level(logging.DEBUG)
    count = 60
    for i in range(count):
        request = f"GET /events/{sid} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()
        await asyncio.to_thread(_connect_and_reset, port, request, (i % 6) * 0.004)
    # Each is noticed while its handler waits (aiohttp cancels it), before its headers are written, or at
    # the next token written to it (every 0.1 s).
    deadline = time.monotonic() + 10
    while (left := await metric_value(client, "chatbot_client_disconnects_total")) != count:
        assert time.monotonic() < deadline, f"{left} of {count} early leavers counted"
        await asyncio.sleep(0.1)
    assert await metric_value(client, "chatbot_client_disconnects_total", stage="before_response") >= 1
    deadline = time.monotonic() + 5
    while await metric_value(client, "chatbot_open_streams"):
        assert time.monotonic() < deadline, "a stream of a client that left stays open"
        await asyncio.sleep(0.1)
    # A POST whose body never arrives whole: the same, counted and quiet (a quick read after it is not).
    before = count
    post = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
    read = f"GET /sessions/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for request in (post, post, read):
        await asyncio.to_thread(_connect_and_reset, port, request, 0.05)
    deadline = time.monotonic() + 5
    while await metric_value(client, "chatbot_client_disconnects_total") < before + 2:
        assert time.monotonic() < deadline, "a POST cut mid-body was not counted"
        await asyncio.sleep(0.05)
    assert await metric_value(client, "chatbot_client_disconnects_total", stage="before_response") >= 1
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud]
    assert await metric_value(client, "chatbot_redis_errors_total") == 0
    assert (await first_event(client, sid)).type == "token"  # and the service still serves the session


async def test_events_sent_counts_events_written_per_response(make_client: MakeClient) -> None:
    client = await make_client()
    sid = (await create_session(client))["id"]
    first = await wait_terminal(client, sid)
    second = await wait_terminal(client, sid)
    written = len(first.events) + len(second.events)
    assert await metric_value(client, "chatbot_events_sent_total") == written
    text = await (await client.get("/metrics")).text()
    assert "handed to the socket" in text
    # Kept as a plain number and read at scrape time (metrics.Tally), it is still a counter to Prometheus.
    from prometheus_client.parser import text_string_to_metric_families

    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert kinds["chatbot_events_sent"] == kinds["chatbot_tokens_relayed"] == "counter"
    assert "chatbot_events_sent_created" in text
    # As prometheus_client's own counters: no `_created` series once it is told to leave them out
    # (PROMETHEUS_DISABLE_CREATED_SERIES, read when it is imported).
    import prometheus_client

    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        text = await (await client.get("/metrics")).text()
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]
    assert "chatbot_events_sent_total" in text and "_created" not in text
