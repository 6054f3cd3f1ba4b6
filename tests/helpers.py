"""Small HTTP helpers the acceptance tests share; each asserts the contract on the way."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tests.sse import Event, SSEParser, read_all

PROBLEM = "application/problem+json"
EVENT_ID = re.compile(r"\A(\d+)-(\d+)\Z")
SESSION_ID = re.compile(r"\A[A-Za-z0-9_-]{22}\Z")
STATUSES = {"queued", "streaming", "done", "cancelled", "failed"}
TERMINAL = {"done", "error"}


def id_key(event_id: str) -> tuple[int, int]:
    match = EVENT_ID.match(event_id)
    assert match, f"event id {event_id!r} is not a Redis stream id"
    return int(match.group(1)), int(match.group(2))


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


async def assert_problem(resp: Any, status: int | set[int]) -> dict[str, Any]:
    """The response is an RFC 9457 problem with the given status; returns its body."""
    body = await resp.read()
    allowed = {status} if isinstance(status, int) else status
    assert resp.status in allowed, f"expected {sorted(allowed)}, got {resp.status}: {body[:300]!r}"
    assert media_type(resp.headers.get("Content-Type")) == PROBLEM, (
        f"{resp.status} has Content-Type {resp.headers.get('Content-Type')!r}: {body[:300]!r}"
    )
    problem = json.loads(body)
    assert isinstance(problem, dict)
    for key in ("type", "title", "status", "detail"):
        assert key in problem, f"problem lacks {key!r}: {problem}"
    assert problem["status"] == resp.status
    assert isinstance(problem["type"], str) and problem["type"]
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str)
    return problem


async def create_session(client: Any, message: str = "Hello there", **extra: Any) -> dict[str, Any]:
    resp = await client.post("/sessions", json={"message": message, **extra})
    body = await resp.read()
    assert resp.status == 201, f"POST /sessions gave {resp.status}: {body[:300]!r}"
    assert media_type(resp.headers.get("Content-Type")) == "application/json"
    created: dict[str, Any] = json.loads(body)
    assert set(created) == {"id", "conversation_id", "events_url"}, created
    assert created["events_url"] == f"/events/{created['id']}"
    assert resp.headers.get("Location"), "201 without a Location header"
    return created


@dataclass
class Stream:
    status: int
    headers: Any
    raw_prefix: bytes
    events: list[Event]
    parser: SSEParser


async def read_stream(client: Any, session_id: str, *, last_event_id: str | None = None, by: str = "header") -> Stream:
    """GET /events/<id> to its end (optionally resuming by header or query) and parse it."""
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    if last_event_id is not None:
        if by == "header":
            headers["Last-Event-ID"] = last_event_id
        else:
            params["last_event_id"] = last_event_id
    async with client.get(f"/events/{session_id}", headers=headers, params=params) as resp:
        if resp.status != 200:
            body = await resp.read()
            return Stream(resp.status, resp.headers, body, [], SSEParser())
        assert media_type(resp.headers.get("Content-Type")) == "text/event-stream"
        parser = SSEParser()
        prefix = await resp.content.read(6)
        events = parser.feed(prefix)
        events += await read_all(resp, parser)
        return Stream(resp.status, resp.headers, prefix, events, parser)


def assert_well_formed(events: list[Event], *, complete: bool = True) -> None:
    """Ids present and strictly increasing, one JSON data line each, terminal only at the end."""
    keys = []
    for i, event in enumerate(events):
        assert event.id is not None, f"event {i} has no id"
        keys.append(id_key(event.id))
        assert event.data_lines == 1, f"event {i} has {event.data_lines} data lines"
        payload = json.loads(event.data)
        assert isinstance(payload, dict)
        assert event.type in {"sources", "token", "reasoning", "done", "error"}, event.type
        if event.type == "sources":
            assert sum(e.type == "sources" for e in events) == 1, "more than one sources event"
            assert all(e.type != "token" for e in events[:i]), "sources after a token"
            sources = payload.get("sources")
            assert isinstance(sources, list) and sources, payload
            assert all(set(s) == {"title", "url"} for s in sources), payload
        elif event.type in ("token", "reasoning"):
            assert isinstance(payload.get("text"), str), payload
        elif event.type == "done":
            assert payload.get("finish_reason") in {"stop", "length", "content_filter", "cancelled"}, payload
        else:
            assert isinstance(payload.get("code"), str), payload
            assert isinstance(payload.get("message"), str), payload
            assert isinstance(payload.get("retryable"), bool), payload
        if event.type in TERMINAL:
            assert i == len(events) - 1, f"terminal {event.type} at {i} is followed by more events"
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "ids are not strictly increasing"
    if complete:
        assert events, "no events"
        assert events[-1].type in TERMINAL, f"stream ended without a terminal event: {events[-1].type}"


def text_of(events: list[Event], kind: str = "token") -> str:
    """The text of the `token` events (or of another kind with a text field, such as `reasoning`)."""
    return "".join(json.loads(e.data)["text"] for e in events if e.type == kind)


async def get_session(client: Any, session_id: str) -> dict[str, Any]:
    resp = await client.get(f"/sessions/{session_id}")
    body = await resp.read()
    assert resp.status == 200, f"GET /sessions/{session_id} gave {resp.status}: {body[:300]!r}"
    assert media_type(resp.headers.get("Content-Type")) == "application/json"
    data: dict[str, Any] = json.loads(body)
    assert set(data) >= {"id", "conversation_id", "status", "text"}, data
    assert data["status"] in STATUSES, data
    return data


async def wait_terminal(client: Any, session_id: str) -> Stream:
    """Read the whole stream; it ends when the session reaches its terminal event."""
    stream = await read_stream(client, session_id)
    assert stream.status == 200, stream.raw_prefix
    assert_well_formed(stream.events)
    return stream


async def first_event(client: Any, session_id: str, kind: str = "token") -> Event:
    """Open the stream and return its first event of the given type (then drop the connection)."""
    async with client.get(f"/events/{session_id}") as resp:
        assert resp.status == 200
        parser = SSEParser()
        while True:
            chunk = await resp.content.readany()
            assert chunk, "stream ended before the awaited event"
            for event in parser.feed(chunk):
                if event.type == kind:
                    return event


async def metric_value(client: Any, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels, read from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = await client.get("/metrics")
    assert resp.status == 200
    total = 0.0
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


COME_BACK = re.compile(rb"\A: ([a-z_]+)\r\nretry: ([0-9]+)\r\n\Z")


async def assert_come_back(resp: Any, reason: str, wait_seconds: float, *, jitter: float = 0.5) -> int:
    """A passing condition on /events/: 200 text/event-stream, a comment naming it, `retry:` with jitter, the end."""
    body = await resp.read()
    assert resp.status == 200, f"{resp.status}: {body[:300]!r}"
    assert media_type(resp.headers.get("Content-Type")) == "text/event-stream"
    assert resp.headers.get("Cache-Control") == "no-store"
    match = COME_BACK.match(body)
    assert match, f"not a lone comment + retry: {body!r}"
    assert match.group(1).decode() == reason
    retry_ms = int(match.group(2))
    assert wait_seconds * 1000 <= retry_ms < wait_seconds * 1000 * (1 + jitter) + 1, retry_ms
    return retry_ms
