"""The real app and the real SDKs against fake OpenAI and Anthropic upstreams on loopback.

Each test runs once per API; the fake speaks that API's exact wire format and
records what it received and when the client went away.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from redis import asyncio as aioredis

from chatbot.app import create_app
from chatbot.settings import Settings
from tests.conftest import make_settings
from tests.helpers import assert_problem, create_session, first_event, get_session, text_of, wait_terminal
from tests.oracle import stall_writes_repeatedly
from tests.providers_fakes import FakeUpstream, Reply, anthropic_events, openai_events, split_bytes

pytestmark = pytest.mark.timeout(30)

TRICKY = [
    "héllo wörld ",
    "😀👩‍👩‍👧 日本語 ",
    "line\u2028sep\u2029para\u0085nel\x0bvt\x0cff ",
    "new\nline\r\ncrlf\rcr ",
    'quote " backslash \\ slash / ',
    "data: x\n\nid: 9\nevent: done\n\n",
    "<script>alert('x')</script> &amp; ",
    "\t tab and trailing space ",
]
Client = TestClient[Any, Any]


@pytest.fixture(params=["openai", "anthropic"])
def api(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def events_for(api: str) -> Callable[..., list[bytes]]:
    return openai_events if api == "openai" else anthropic_events


def stop_reason(api: str, reason: str) -> dict[str, str]:
    """The API's own word for a finish reason."""
    if api == "openai":
        return {"finish_reason": reason}
    return {"stop_reason": {"stop": "end_turn", "length": "max_tokens"}[reason]}


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def provider_settings(api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Settings:
    """The SDK finds the fake through its own environment variables, as it would a real endpoint."""
    if api == "openai":
        monkeypatch.setenv("OPENAI_BASE_URL", upstream.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    else:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", upstream.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    redis_url = overrides.pop("redis_url", None)
    fields: dict[str, Any] = {
        "provider": api,
        "model": "fake-model",
        "upstream_idle_timeout_seconds": 1.0,
        "upstream_max_retries": 1,
        **overrides,
    }
    return make_settings("redis" if redis_url else "embedded", redis_url, **fields)


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Settings], Any]]:
    clients: list[Client] = []

    async def start(settings: Settings) -> Client:
        client: Client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


def done_payload(stream: Any) -> dict[str, Any]:
    last = stream.events[-1]
    assert last.type == "done", (last.type, last.data)
    payload: dict[str, Any] = json.loads(last.data)
    return payload


def error_payload(stream: Any) -> dict[str, Any]:
    last = stream.events[-1]
    assert last.type == "error", (last.type, last.data)
    payload: dict[str, Any] = json.loads(last.data)
    return payload


async def answer(client: Client, message: str = "Hi", **extra: Any) -> tuple[dict[str, Any], Any]:
    created = await create_session(client, message, **extra)
    return created, await wait_terminal(client, created["id"])


@pytest.mark.parametrize("cut", [1, 2, 3, 7])
async def test_text_arrives_exactly_even_when_writes_split_characters(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, cut: int
) -> None:
    pieces = split_bytes(events_for(api)(TRICKY), cut)
    upstream.script(Reply(pieces, pause=0.0005 if cut > 2 else 0.0))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    created, stream = await answer(client)
    assert text_of(stream.events) == "".join(TRICKY)
    assert (await get_session(client, created["id"]))["text"] == "".join(TRICKY)
    assert done_payload(stream) == {"finish_reason": "stop", "usage": {"input_tokens": 7, "output_tokens": 11}}


async def test_deltas_bursting_while_appends_wait_reach_readers_whole(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    """Hundreds of deltas arrive while Redis holds the appends back: each entry joins many of them, and the
    text a reader gets and the stored text are exactly what the upstream sent."""
    deltas = [f"{TRICKY[i % len(TRICKY)]}{i} " for i in range(300)]
    upstream.script(Reply(events_for(api)(deltas), pause=0.001))  # one TCP write per upstream event
    client = await serve(provider_settings(api, upstream, monkeypatch, redis_url=redis_url))
    created = await create_session(client, "Burst")
    stalls = asyncio.create_task(stall_writes_repeatedly(redis_url, pulses=3, pause=0.1, gap=0.02))
    stream = await wait_terminal(client, created["id"])
    await stalls
    assert text_of(stream.events) == "".join(deltas)
    assert (await get_session(client, created["id"]))["text"] == "".join(deltas)
    assert done_payload(stream) == {"finish_reason": "stop", "usage": {"input_tokens": 7, "output_tokens": 11}}
    tokens = sum(e.type == "token" for e in stream.events)
    assert tokens < len(deltas) // 2, f"{tokens} entries for {len(deltas)} deltas: the writer did not coalesce"


async def test_carriage_return_line_endings_are_understood(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    crlf = [event.replace(b"\n", b"\r\n") for event in events_for(api)(["a\n", "b"])]
    upstream.script(Reply(split_bytes(crlf, 5), pause=0.0005))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    _, stream = await answer(client)
    assert text_of(stream.events) == "a\nb"


async def test_length_finish_and_usage_reach_done(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    upstream.script(Reply(events_for(api)(["cut", " short"], usage=(123, 4096), **stop_reason(api, "length"))))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    _, stream = await answer(client)
    assert done_payload(stream) == {"finish_reason": "length", "usage": {"input_tokens": 123, "output_tokens": 4096}}


async def test_request_carries_model_stream_and_usage_options(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    upstream.script(Reply(events_for(api)(["ok"])))
    client = await serve(provider_settings(api, upstream, monkeypatch, max_output_tokens=321))
    await answer(client, "Ping")
    sent = upstream.requests[0]
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "Ping"}]
    if api == "openai":
        assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 321
        assert upstream.headers[0]["Authorization"] == "Bearer sk-test"
    else:
        assert sent["max_tokens"] == 321


async def test_second_turn_sends_the_history_and_system_prompt(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    upstream.script(Reply(events_for(api)(["Paris", " it is."])), Reply(events_for(api)(["About 2.1 million."])))
    settings = provider_settings(api, upstream, monkeypatch, system_prompt="Be brief.", redis_url=redis_url)
    client = await serve(settings)
    first, _ = await answer(client, "Capital of France?")
    second, stream = await answer(client, "Population?", conversation_id=first["conversation_id"])
    assert second["conversation_id"] == first["conversation_id"]
    assert text_of(stream.events) == "About 2.1 million."
    turns = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris it is."},
        {"role": "user", "content": "Population?"},
    ]
    if api == "openai":
        assert upstream.requests[1]["messages"] == [{"role": "system", "content": "Be brief."}, *turns]
    else:
        assert upstream.requests[1]["system"] == "Be brief."
        assert upstream.requests[1]["messages"] == turns


async def test_connection_lost_mid_answer_fails_keeping_the_text(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    events = events_for(api)(["Half ", "an ", "answer"])
    upstream.script(Reply(events[:4], pause=0.01, then="drop"))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    created, stream = await answer(client)
    assert error_payload(stream)["code"] == "upstream_disconnected"
    assert error_payload(stream)["retryable"] is True
    session = await get_session(client, created["id"])
    assert session["status"] == "failed"
    assert session["text"] == text_of(stream.events) != ""
    assert "Half an answer".startswith(session["text"])


async def test_body_that_ends_before_any_finish_reason_is_a_lost_connection(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    events = events_for(api)(["Half ", "an ", "answer"])
    upstream.script(Reply(events[:-3]))  # a clean end of body before the finish / stop reason
    client = await serve(provider_settings(api, upstream, monkeypatch))
    created, stream = await answer(client)
    assert error_payload(stream)["code"] == "upstream_disconnected"
    assert (await get_session(client, created["id"]))["text"] == "Half an answer"


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_fail_at_once_and_are_not_retryable(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, status: int
) -> None:
    upstream.script(Reply(status=status))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    created, stream = await answer(client)
    assert error_payload(stream)["code"] == "upstream_auth"
    assert error_payload(stream)["retryable"] is False
    assert "sk-" not in error_payload(stream)["message"]
    assert len(upstream.requests) == 1, "the SDK must not retry refused credentials"
    assert (await get_session(client, created["id"]))["status"] == "failed"


@pytest.mark.parametrize(("status", "code"), [(429, "upstream_rate_limited"), (503, "upstream_unavailable")])
async def test_overload_is_retried_by_the_sdk_then_retryable(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, status: int, code: str
) -> None:
    upstream.script(Reply(status=status, headers={"retry-after-ms": "10"}))
    client = await serve(provider_settings(api, upstream, monkeypatch, upstream_max_retries=2))
    _, stream = await answer(client)
    assert error_payload(stream)["code"] == code
    assert error_payload(stream)["retryable"] is True
    assert len(upstream.requests) == 3, "one request and the SDK's two retries"


async def test_retry_before_the_first_byte_recovers(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    upstream.script(Reply(status=529, headers={"retry-after-ms": "10"}), Reply(events_for(api)(["fine"])))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    _, stream = await answer(client)
    assert text_of(stream.events) == "fine" and done_payload(stream)["finish_reason"] == "stop"


async def test_stalled_upstream_is_cut_after_the_idle_timeout(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    events = events_for(api)(["Thinking", " hard"])
    upstream.script(Reply(events[:3], then="stall"))
    client = await serve(provider_settings(api, upstream, monkeypatch, upstream_idle_timeout_seconds=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    created, stream = await answer(client)
    assert error_payload(stream)["code"] == "upstream_timeout"
    assert 0.4 < loop.time() - started < 5
    await asyncio.wait_for(upstream.disconnected.wait(), 2)
    assert (await get_session(client, created["id"]))["status"] == "failed"


async def test_an_upstream_that_goes_quiet_mid_answer_is_cut_after_the_idle_timeout(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    # Pieces 0.2 s apart for about 1.6 s (past the 0.5 s timeout, so only a per-body timer that keeps
    # being re-armed, or the watch that replaced it, can tell slow from silent), then silence.
    words = [f"w{i} " for i in range(6)]
    pieces = (1 if api == "openai" else 3) + len(words)  # the head, then one piece per word; no end
    upstream.script(Reply(events_for(api)(words)[:pieces], pause=0.2, then="stall"))
    client = await serve(provider_settings(api, upstream, monkeypatch, upstream_idle_timeout_seconds=0.5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    created, stream = await answer(client)
    took = loop.time() - started
    assert error_payload(stream)["code"] == "upstream_timeout"
    assert text_of(stream.events) == "".join(words)  # slow pieces were never cut; every word is kept
    assert (pieces - 1) * 0.2 + 0.45 < took < (pieces - 1) * 0.2 + 2.5
    await asyncio.wait_for(upstream.disconnected.wait(), 2)
    assert (await get_session(client, created["id"]))["status"] == "failed"


async def test_cancel_closes_the_upstream_connection_and_keeps_the_text_in_history(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    endless = events_for(api)(["tick "])
    body = 2 if api == "openai" else 4  # events before the first delta
    upstream.script(Reply(endless[:body], pause=0.01, forever=endless[body]), Reply(events_for(api)(["ok"])))
    client = await serve(provider_settings(api, upstream, monkeypatch, redis_url=redis_url))
    created = await create_session(client, "Count forever")
    await first_event(client, created["id"])
    resp = await client.post(f"/sessions/{created['id']}/cancel")
    assert resp.status == 202
    await asyncio.wait_for(upstream.disconnected.wait(), 2)
    stream = await wait_terminal(client, created["id"])
    assert done_payload(stream)["finish_reason"] == "cancelled"
    produced = text_of(stream.events)
    assert produced.startswith("tick ") and set(produced.split()) == {"tick"}
    await answer(client, "And now?", conversation_id=created["conversation_id"])
    assert upstream.requests[1]["messages"][:2] == [
        {"role": "user", "content": "Count forever"},
        {"role": "assistant", "content": produced},
    ]


async def test_error_event_in_the_stream_ends_the_answer(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    events = events_for(api)(["Some text"])
    if api == "openai":
        failure = b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
    else:
        failure = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}\n\n'
    upstream.script(Reply([*events[: 2 if api == "openai" else 4], failure]))
    client = await serve(provider_settings(api, upstream, monkeypatch))
    created, stream = await answer(client)
    expected = "upstream_error" if api == "openai" else "upstream_unavailable"
    assert error_payload(stream)["code"] == expected
    assert (await get_session(client, created["id"]))["text"] == "Some text"


def _sent_turns(request: dict[str, Any]) -> Sequence[str]:
    return [m["content"] for m in request["messages"] if m["role"] != "system"]


async def test_history_keeps_the_newest_turns_within_its_caps(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    upstream.script(*(Reply(openai_events([f"answer {i}"])) for i in range(5)))
    settings = provider_settings("openai", upstream, monkeypatch, redis_url=redis_url, history_max_turns=2)
    client = await serve(settings)
    first, _ = await answer(client, "q0")
    for i in range(1, 5):
        await answer(client, f"q{i}", conversation_id=first["conversation_id"])
    assert _sent_turns(upstream.requests[4]) == ["q2", "answer 2", "q3", "answer 3", "q4"]


async def test_history_drops_oldest_turns_beyond_the_character_cap(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    upstream.script(Reply(openai_events(["x" * 40])))
    settings = provider_settings("openai", upstream, monkeypatch, redis_url=redis_url, history_max_chars=100)
    client = await serve(settings)
    first, _ = await answer(client, "a" * 10)
    cid = first["conversation_id"]
    await answer(client, "b" * 10, conversation_id=cid)  # history now 2 turns of 50 characters: at the cap
    await answer(client, "c" * 10, conversation_id=cid)  # the first turn goes
    await answer(client, "d", conversation_id=cid)
    assert _sent_turns(upstream.requests[3]) == ["b" * 10, "x" * 40, "c" * 10, "x" * 40, "d"]


async def test_the_upstream_request_starts_while_the_session_is_being_stored(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    """Time to first token: the model is asked before the store has answered. Its whole answer arrives while
    Redis holds every write back (CLIENT PAUSE), and the reader still gets all of it, in order, once the
    session is stored."""
    words = [f"word{i} " for i in range(30)]
    upstream.script(Reply(events_for(api)(words)))
    client = await serve(provider_settings(api, upstream, monkeypatch, redis_url=redis_url, rate_limit=0))
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.client_pause(800, all=False)  # writes wait; reads go on
        posting = asyncio.create_task(client.post("/sessions", json={"message": "Quick, while Redis sleeps"}))
        for _ in range(60):
            if upstream.requests:
                break
            await asyncio.sleep(0.01)
        assert upstream.requests, "the upstream was not asked while the session was being stored"
        assert not posting.done(), "the POST was answered before Redis accepted a write: the test tested nothing"
        resp = await posting
        assert resp.status == 201, await resp.text()
        created = await resp.json()
    finally:
        await admin.client_unpause()
        await admin.aclose()
    stream = await wait_terminal(client, created["id"])
    assert text_of(stream.events) == "".join(words)
    assert done_payload(stream)["finish_reason"] == "stop"
    assert (await get_session(client, created["id"]))["text"] == "".join(words)


@pytest.mark.parametrize("fault", ["out-of-memory", "read-only"])
async def test_a_session_that_cannot_be_stored_drops_its_upstream_request_and_writes_nothing(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str, fault: str
) -> None:
    endless = events_for(api)(["tick "])
    body = 2 if api == "openai" else 4  # events before the first delta
    upstream.script(Reply(endless[:body], pause=0.01, forever=endless[body]), Reply(events_for(api)(["fine"])))
    client = await serve(provider_settings(api, upstream, monkeypatch, redis_url=redis_url, rate_limit=0))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    setting = ("maxmemory", "1") if fault == "out-of-memory" else ("replica-read-only", "yes")
    try:
        if fault == "out-of-memory":
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set(*setting)
        else:  # a failed-over node that became a replica refuses every write
            await admin.replicaof("127.0.0.1", 1)  # nobody there: it stays a read-only replica
        # Held for a moment first, so that the upstream is surely asked before the store says no.
        await admin.client_pause(300, all=False)
        resp = await client.post("/sessions", json={"message": "Count forever"})
        problem = await assert_problem(resp, 503)
        assert problem["type"].endswith("/store-unavailable")
        assert len(upstream.requests) == 1
        await asyncio.wait_for(upstream.disconnected.wait(), 2)  # given up at once, not read to its end
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.replicaof("NO", "ONE")
    assert [k for k in await admin.keys("*") if not str(k).startswith("chatbot:rate")] == []
    await admin.aclose()
    _, stream = await answer(client, "And now?")  # the instance is fine once the store is
    assert text_of(stream.events) == "fine"
