"""The HTTP contract of the service, over real HTTP, on both stores (real redis-server and embedded)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import secrets
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from chatbot.settings import Settings
from tests.conftest import RedisServer, make_settings
from tests.helpers import (
    EVENT_ID,
    SESSION_ID,
    STATUSES,
    assert_problem,
    assert_well_formed,
    create_session,
    first_event,
    get_session,
    id_key,
    media_type,
    read_stream,
    text_of,
    wait_terminal,
)
from tests.sse import Event, SSEParser

pytestmark = pytest.mark.timeout(30)

SLOW = {"demo_tokens_per_second": 20.0, "demo_answer_tokens": 200}  # 10 s: always live during a test
MEDIUM = {"demo_tokens_per_second": 100.0, "demo_answer_tokens": 100}  # 1 s


def unknown_id() -> str:
    return secrets.token_urlsafe(16)


# --- creating sessions ---------------------------------------------------------------------------


async def test_post_session_returns_201_with_ids_and_location(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/sessions", json={"message": "Hello"})
    assert resp.status == 201
    assert media_type(resp.headers["Content-Type"]) == "application/json"
    body = await resp.json()
    assert set(body) == {"id", "conversation_id", "events_url"}
    assert SESSION_ID.match(body["id"]), body["id"]
    assert len(base64.urlsafe_b64decode(body["id"] + "==")) == 16
    assert isinstance(body["conversation_id"], str)
    assert len(body["conversation_id"]) >= 22
    assert body["events_url"] == f"/events/{body['id']}"
    location = URL(resp.headers["Location"])
    assert location.path in {f"/sessions/{body['id']}", body["events_url"]}, location
    # the Location resolves
    followed = await client.get(location.path)
    assert followed.status == 200
    await followed.read()


async def test_session_and_conversation_ids_are_unique(client: TestClient[Any, Any]) -> None:
    created = [await create_session(client, f"message {i}") for i in range(20)]
    ids = {c["id"] for c in created}
    conversations = {c["conversation_id"] for c in created}
    assert len(ids) == 20
    assert len(conversations) == 20
    assert not ids & conversations or all(c["id"] == c["conversation_id"] for c in created)


async def test_follow_up_joins_the_conversation(client: TestClient[Any, Any]) -> None:
    first = await create_session(client, "first question")
    await wait_terminal(client, first["id"])
    second = await create_session(client, "follow-up", conversation_id=first["conversation_id"])
    assert second["conversation_id"] == first["conversation_id"]
    assert second["id"] != first["id"]
    state = await get_session(client, second["id"])
    assert state["conversation_id"] == first["conversation_id"]
    stream = await wait_terminal(client, second["id"])
    assert stream.events[-1].type == "done"


async def test_unknown_conversation_is_404(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/sessions", json={"message": "hi", "conversation_id": unknown_id()})
    await assert_problem(resp, 404)


async def test_session_id_is_not_a_conversation_id(client: TestClient[Any, Any]) -> None:
    first = await create_session(client)
    if first["id"] == first["conversation_id"]:
        pytest.skip("this service uses the first session id as the conversation id")
    resp = await client.post("/sessions", json={"message": "hi", "conversation_id": first["id"]})
    await assert_problem(resp, 404)


# --- reading the stream --------------------------------------------------------------------------


async def test_stream_is_well_formed_and_matches_session_text(client: TestClient[Any, Any], settings: Settings) -> None:
    created = await create_session(client)
    stream = await read_stream(client, created["id"])
    assert stream.status == 200
    assert media_type(stream.headers["Content-Type"]) == "text/event-stream"
    assert stream.raw_prefix.startswith(b"retry:"), stream.raw_prefix
    assert stream.parser.retries[:1] == [settings.sse_retry_ms]
    assert stream.headers.get("Content-Encoding") in (None, "identity")
    assert_well_formed(stream.events)
    tokens = [e for e in stream.events if e.type == "token"]
    assert len(tokens) >= 1
    assert len(tokens) <= settings.demo_answer_tokens
    done = stream.events[-1]
    assert done.type == "done"
    assert done.json()["finish_reason"] in {"stop", "length"}
    state = await get_session(client, created["id"])
    assert state["status"] == "done"
    assert state["id"] == created["id"]
    assert state["conversation_id"] == created["conversation_id"]
    assert state["text"] == text_of(stream.events)
    assert state["text"], "the demo answer is empty"


async def test_stream_is_not_compressed_even_if_client_accepts_gzip(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    async with client.get(
        f"/events/{created['id']}", headers={"Accept-Encoding": "gzip, deflate, br"}, auto_decompress=False
    ) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Encoding") in (None, "identity")
        raw = await resp.read()
    assert raw.startswith(b"retry:")


@pytest.mark.settings(**SLOW)
async def test_tokens_arrive_while_the_answer_is_generated(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    started = time.monotonic()
    async with asyncio.timeout(5):
        event = await first_event(client, created["id"], "token")
    assert time.monotonic() - started < 5
    assert EVENT_ID.match(event.id or "")
    state = await get_session(client, created["id"])
    assert state["status"] == "streaming"
    assert state["text"].startswith(event.json()["text"])


@pytest.mark.settings(**MEDIUM)
async def test_two_readers_see_the_same_events(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    a, b = await asyncio.gather(read_stream(client, created["id"]), read_stream(client, created["id"]))
    assert_well_formed(a.events)
    assert [(e.id, e.type, e.data) for e in a.events] == [(e.id, e.type, e.data) for e in b.events]
    late = await read_stream(client, created["id"])
    assert [(e.id, e.type, e.data) for e in late.events] == [(e.id, e.type, e.data) for e in a.events]


async def test_session_status_goes_queued_streaming_done(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    order = ["queued", "streaming", "done"]
    seen: list[str] = []
    texts: list[str] = []
    while True:
        state = await get_session(client, created["id"])
        assert state["status"] in order, state
        seen.append(state["status"])
        texts.append(state["text"])
        if state["status"] == "done":
            break
    ranks = [order.index(s) for s in seen]
    assert ranks == sorted(ranks), seen
    final = texts[-1]
    assert all(final.startswith(t) for t in texts), "the text shrank or changed while streaming"
    stream = await wait_terminal(client, created["id"])
    assert final == text_of(stream.events)


@pytest.mark.settings(heartbeat_seconds=0.1, demo_tokens_per_second=1.0, demo_answer_tokens=100)
async def test_idle_stream_gets_heartbeat_comments(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    async with client.get(f"/events/{created['id']}") as resp:
        assert resp.status == 200
        parser = SSEParser()
        async with asyncio.timeout(5):
            while len(parser.comments) < 3:
                chunk = await resp.content.readany()
                assert chunk, "stream ended before heartbeats"
                parser.feed(chunk)
    assert all(c == " ping" for c in parser.comments), parser.comments


# --- resuming ------------------------------------------------------------------------------------


def triples(events: list[Any]) -> list[tuple[str | None, str, str]]:
    return [(e.id, e.type, e.data) for e in events]


@pytest.mark.parametrize("by", ["header", "query"])
@pytest.mark.parametrize("position", ["first", "middle", "last_token"])
async def test_resume_yields_exactly_the_later_events(client: TestClient[Any, Any], by: str, position: str) -> None:
    created = await create_session(client)
    full = (await wait_terminal(client, created["id"])).events
    assert len(full) >= 3, "the demo answer is too short to resume in the middle"
    k = {"first": 0, "middle": len(full) // 2, "last_token": len(full) - 2}[position]
    resumed = await read_stream(client, created["id"], last_event_id=full[k].id, by=by)
    assert resumed.status == 200
    assert resumed.raw_prefix.startswith(b"retry:")
    assert triples(resumed.events) == triples(full[k + 1 :])


@pytest.mark.parametrize("by", ["header", "query"])
async def test_resume_after_terminal_is_204(client: TestClient[Any, Any], by: str) -> None:
    created = await create_session(client)
    full = (await wait_terminal(client, created["id"])).events
    resumed = await read_stream(client, created["id"], last_event_id=full[-1].id, by=by)
    assert resumed.status == 204
    assert resumed.raw_prefix == b""


@pytest.mark.settings(**MEDIUM)
async def test_resume_while_live_has_no_gap_and_no_duplicate(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    got: list[Event] = []
    async with client.get(f"/events/{created['id']}") as resp:
        parser = SSEParser()
        while len(got) < 5:
            chunk = await resp.content.readany()
            assert chunk
            got += parser.feed(chunk)
    # dropped mid-answer; resume from the last event fully received
    rest = await read_stream(client, created["id"], last_event_id=got[-1].id)
    assert rest.status == 200
    combined = got + rest.events
    assert_well_formed(combined)
    full = await wait_terminal(client, created["id"])
    assert triples(combined) == triples(full.events)
    assert len(full.events) > 5


async def test_unknown_session_events_is_404(client: TestClient[Any, Any]) -> None:
    await assert_problem(await client.get(f"/events/{unknown_id()}"), 404)
    await assert_problem(await client.get(f"/events/{unknown_id()}", headers={"Last-Event-ID": "1-0"}), 404)


MALFORMED_IDS = [
    "abc",
    "1-",
    "-1",
    "1--0",
    "1-2-3",
    "1.5-0",
    "0x10-0",
    "1-0 junk",
    "-",
    "+",
    "$",
    ">",
    "*",
    "18446744073709551616-0",  # 2**64: beyond a Redis stream id
    "1-18446744073709551616",
    "\uff11-0",  # fullwidth digit one: int() takes it, Redis does not
    "1-0\r\nevent: injected",
]


@pytest.mark.parametrize("bad", MALFORMED_IDS)
async def test_malformed_last_event_id_is_400(client: TestClient[Any, Any], bad: str) -> None:
    created = await create_session(client)
    resp = await client.get(f"/events/{created['id']}", params={"last_event_id": bad})
    await assert_problem(resp, 400)
    if bad.isascii() and bad.isprintable():
        resp = await client.get(f"/events/{created['id']}", headers={"Last-Event-ID": bad})
        await assert_problem(resp, 400)


async def test_id_that_is_not_an_event_of_this_session_is_409(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    full = (await wait_terminal(client, created["id"])).events
    keys = [id_key(e.id or "") for e in full]
    first_ms, _ = keys[0]
    last_ms, _ = keys[-1]
    foreign = [f"{max(first_ms - 1, 0)}-0", f"{last_ms + 1}-0", "0-1"]
    between = [f"{ms}-{seq + 1}" for (ms, seq), nxt in itertools.pairwise(keys) if (ms, seq + 1) < nxt]
    assert between, "no gap between consecutive ids to probe"
    foreign.append(between[len(between) // 2])
    for candidate in foreign:
        assert id_key(candidate) not in keys
        for by in ("header", "query"):
            headers = {"Last-Event-ID": candidate} if by == "header" else {}
            params = {"last_event_id": candidate} if by == "query" else {}
            resp = await client.get(f"/events/{created['id']}", headers=headers, params=params)
            await assert_problem(resp, 409)


async def test_zero_id_is_not_an_event_so_409(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    await wait_terminal(client, created["id"])
    await assert_problem(await client.get(f"/events/{created['id']}", headers={"Last-Event-ID": "0-0"}), 409)


async def test_id_of_another_session_is_409(client: TestClient[Any, Any]) -> None:
    a = await create_session(client, "one")
    a_events = (await wait_terminal(client, a["id"])).events
    b = await create_session(client, "two")
    b_keys = {id_key(e.id or "") for e in (await wait_terminal(client, b["id"])).events}
    # stream ids are per stream: only probe ids that the other stream really lacks
    probes = [e.id for e in a_events if id_key(e.id or "") not in b_keys]
    assert probes
    resp = await client.get(f"/events/{b['id']}", headers={"Last-Event-ID": probes[0] or ""})
    await assert_problem(resp, 409)


# --- session state -------------------------------------------------------------------------------


async def test_unknown_session_state_is_404(client: TestClient[Any, Any]) -> None:
    await assert_problem(await client.get(f"/sessions/{unknown_id()}"), 404)


@pytest.mark.settings(session_ttl_seconds=1)
async def test_expired_session_is_404(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    await wait_terminal(client, created["id"])
    deadline = time.monotonic() + 8
    while True:
        resp = await client.get(f"/sessions/{created['id']}")
        await resp.read()
        if resp.status == 404:
            break
        assert resp.status == 200
        assert time.monotonic() < deadline, "session never expired"
        await asyncio.sleep(0.2)  # waiting for wall-clock expiry: nothing to await
    await assert_problem(await client.get(f"/sessions/{created['id']}"), 404)
    await assert_problem(await client.get(f"/events/{created['id']}"), 404)


# --- cancel --------------------------------------------------------------------------------------


@pytest.mark.settings(**SLOW)
async def test_cancel_live_session_ends_stream_with_cancelled(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    async with asyncio.timeout(5):
        await first_event(client, created["id"], "token")
    reader = asyncio.create_task(read_stream(client, created["id"]))
    resp = await client.post(f"/sessions/{created['id']}/cancel")
    assert resp.status == 202
    await resp.read()
    again = await client.post(f"/sessions/{created['id']}/cancel")
    assert again.status == 202
    await again.read()
    async with asyncio.timeout(3):
        live = await reader
    assert_well_formed(live.events)
    assert live.events[-1].type == "done"
    assert live.events[-1].json()["finish_reason"] == "cancelled"
    tokens = [e for e in live.events if e.type == "token"]
    assert 1 <= len(tokens) < 200
    state = await get_session(client, created["id"])
    assert state["status"] == "cancelled"
    assert state["text"] == text_of(live.events)
    replay = await read_stream(client, created["id"])
    assert triples(replay.events) == triples(live.events)


@pytest.mark.settings(**SLOW)
async def test_cancel_right_after_create(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    resp = await client.post(f"/sessions/{created['id']}/cancel")
    assert resp.status == 202
    await resp.read()
    stream = await wait_terminal(client, created["id"])
    assert stream.events[-1].type == "done"
    assert stream.events[-1].json()["finish_reason"] == "cancelled"
    assert (await get_session(client, created["id"]))["status"] == "cancelled"


async def test_cancel_after_done_keeps_done(client: TestClient[Any, Any]) -> None:
    created = await create_session(client)
    before = await wait_terminal(client, created["id"])
    for _ in range(2):
        resp = await client.post(f"/sessions/{created['id']}/cancel")
        assert resp.status == 202
        await resp.read()
    state = await get_session(client, created["id"])
    assert state["status"] == "done"
    after = await read_stream(client, created["id"])
    assert triples(after.events) == triples(before.events)
    assert after.events[-1].json()["finish_reason"] in {"stop", "length"}


async def test_cancel_unknown_is_404(client: TestClient[Any, Any]) -> None:
    await assert_problem(await client.post(f"/sessions/{unknown_id()}/cancel"), 404)


# --- health --------------------------------------------------------------------------------------


async def test_healthz_and_readyz(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    await resp.read()
    resp = await client.get("/readyz")
    assert resp.status == 200
    await resp.read()


@pytest.mark.timeout(40)
async def test_readyz_follows_redis_and_service_recovers_after_restart() -> None:
    with RedisServer() as server:
        settings = make_settings("redis", server.url)
        from chatbot.app import create_app

        async with TestClient(TestServer(create_app(settings))) as client:
            assert (await client.get("/readyz")).status == 200
            server.stop()
            resp = await client.get("/readyz")
            assert resp.status == 503
            await resp.read()
            healthz = await client.get("/healthz")
            assert healthz.status == 200
            server.start()
            deadline = time.monotonic() + 10
            while (await client.get("/readyz")).status != 200:
                assert time.monotonic() < deadline, "readyz stayed 503 after redis came back"
                await asyncio.sleep(0.1)  # reconnect back-off: nothing to await
            created = await create_session(client)
            stream = await wait_terminal(client, created["id"])
            assert stream.events[-1].type == "done"


def test_settings_fixture_really_uses_both_stores(settings: Settings, store: str) -> None:
    # guards against a fixture bug that would run the "redis" tests on the embedded store
    assert (settings.redis_url is None) == (store == "embedded")
    assert dataclasses.replace(settings).port == 0
    assert {"queued", "streaming", "done", "cancelled", "failed"} == STATUSES


@pytest.mark.parametrize("requests", [0, 1])
async def test_app_shuts_down_promptly(settings: Settings, requests: int) -> None:
    """Cleanup cancels and awaits every task the app owns, whether or not it served anything."""
    from chatbot.app import create_app
    from tests.conftest import close_promptly

    for _ in range(3):
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        for _ in range(requests):
            await (await client.get("/healthz")).read()
        await close_promptly(client)


@pytest.mark.settings(lease_ttl_seconds=0.3, demo_tokens_per_second=50.0, demo_answer_tokens=60)
async def test_long_answer_outlives_its_lease_without_false_failure(client: TestClient[Any, Any]) -> None:
    """An answer lasting several lease periods is renewed, not declared dead: it ends with done."""
    created = await create_session(client)
    started = time.monotonic()
    stream = await wait_terminal(client, created["id"])
    assert time.monotonic() - started > 3 * 0.3, "the answer was too short to outlive its lease"
    assert stream.events[-1].type == "done", stream.events[-1]
    assert (await get_session(client, created["id"]))["status"] == "done"
