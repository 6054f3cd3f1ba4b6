"""Bad input never yields 5xx, always an RFC 9457 problem, and never costs data already stored."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import payload
from aiohttp.test_utils import TestClient

from tests.helpers import (
    assert_problem,
    assert_well_formed,
    create_session,
    get_session,
    read_stream,
    text_of,
    wait_terminal,
)

MAX_CHARS = 200
MAX_BODY = 4096

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.settings(max_message_chars=MAX_CHARS, max_body_bytes=MAX_BODY, demo_tokens_per_second=1000.0),
]

JSON = "application/json"


def raw(text: str) -> bytes:
    return text.encode()


# (id, body bytes, content type or None for no header, expected status or set of statuses)
CASES: list[tuple[str, bytes, str | None, int | set[int]]] = [
    # not JSON at all, or not UTF-8
    ("truncated-json", b'{"message": "hi"', JSON, 400),
    ("empty-body", b"", JSON, 400),
    ("garbage", b"\x00\x01\x02", JSON, 400),
    ("trailing-garbage", b'{"message": "hi"} x', JSON, 400),
    ("single-quotes", b"{'message': 'hi'}", JSON, 400),
    ("latin1-bytes", b'{"message": "caf\xe9"}', JSON, 400),
    ("invalid-utf8-start", b'{"message": "\xff\xfe"}', JSON, 400),
    ("overlong-utf8", b'{"message": "\xc0\xaf"}', JSON, 400),
    ("encoded-surrogate-utf8", b'{"message": "\xed\xa0\x80"}', JSON, 400),
    ("truncated-utf8", b'{"message": "\xe2\x82"}', JSON, 400),
    ("utf16-body", '{"message": "hi"}'.encode("utf-16"), JSON, 400),
    # wrong or missing media type
    ("text-plain", raw('{"message": "hi"}'), "text/plain", 415),
    ("form", b"message=hi", "application/x-www-form-urlencoded", 415),
    ("octet-stream", raw('{"message": "hi"}'), "application/octet-stream", 415),
    ("no-content-type", raw('{"message": "hi"}'), None, 415),
    ("json-lookalike", raw('{"message": "hi"}'), "application/jsonx", 415),
    # JSON but not an acceptable message
    ("empty-object", raw("{}"), JSON, 422),
    ("empty-message", raw('{"message": ""}'), JSON, 422),
    ("blank-message", raw('{"message": "   "}'), JSON, 422),
    ("whitespace-message", raw('{"message": "\\n\\t\\r "}'), JSON, 422),
    ("null-message", raw('{"message": null}'), JSON, 422),
    ("number-message", raw('{"message": 42}'), JSON, 422),
    ("bool-message", raw('{"message": true}'), JSON, 422),
    ("list-message", raw('{"message": ["hi"]}'), JSON, 422),
    ("object-message", raw('{"message": {"text": "hi"}}'), JSON, 422),
    ("wrong-key", raw('{"text": "hi"}'), JSON, 422),
    ("too-long", raw(json.dumps({"message": "x" * (MAX_CHARS + 1)})), JSON, 422),
    ("too-long-multibyte", raw(json.dumps({"message": "\u00e9" * (MAX_CHARS + 1)}, ensure_ascii=False)), JSON, 422),
    ("lone-high-surrogate", raw('{"message": "hi \\ud800"}'), JSON, 422),
    ("lone-low-surrogate", raw('{"message": "\\udc00 hi"}'), JSON, 422),
    ("reversed-surrogates", raw('{"message": "\\ude00\\ud83d"}'), JSON, 422),
    ("non-string-conversation", raw('{"message": "hi", "conversation_id": 7}'), JSON, {400, 404, 422}),
    ("empty-conversation", raw('{"message": "hi", "conversation_id": ""}'), JSON, {400, 404, 422}),
    ("unknown-conversation", raw('{"message": "hi", "conversation_id": "AAAAAAAAAAAAAAAAAAAAAA"}'), JSON, 404),
    ("traversal-conversation", raw('{"message": "hi", "conversation_id": "../../x"}'), JSON, {400, 404, 422}),
    # JSON whose top level is not an object
    ("array", raw('["hi"]'), JSON, {400, 422}),
    ("string", raw('"hi"'), JSON, {400, 422}),
    ("null", raw("null"), JSON, {400, 422}),
    ("number", raw("1"), JSON, {400, 422}),
    # too big
    ("body-over-limit", raw(json.dumps({"message": "hi", "pad": "x" * MAX_BODY})), JSON, 413),
    ("message-over-body-limit", raw(json.dumps({"message": "y" * (MAX_BODY * 2)})), JSON, 413),
    # parser bombs
    ("deep-array", raw('{"message": "hi", "x": ' + "[" * 1500 + "]" * 1500 + "}"), JSON, {400, 413, 422}),
    ("huge-int", raw('{"message": "hi", "n": ' + "9" * 4400 + "}"), JSON, {400, 413, 422}),
    ("huge-int-message", raw('{"message": ' + "9" * 4400 + "}"), JSON, {400, 413, 422}),
    ("huge-float", raw('{"message": "hi", "n": 1e999999}'), JSON, {400, 422}),
    ("nan", raw('{"message": "hi", "n": NaN}'), JSON, {400, 422}),
    ("infinity", raw('{"message": "hi", "n": Infinity}'), JSON, {400, 422}),
    ("minus-infinity", raw('{"message": "hi", "n": -Infinity}'), JSON, {400, 422}),
    ("nan-message", raw('{"message": NaN}'), JSON, {400, 422}),
]


@pytest_asyncio.fixture
async def stored(client: TestClient[Any, Any]) -> AsyncIterator[dict[str, Any]]:
    """A finished session, read fully before the bad request; the test checks it is intact after."""
    created = await create_session(client, "keep me")
    stream = await wait_terminal(client, created["id"])
    state = await get_session(client, created["id"])
    assert state["status"] == "done"
    yield {"created": created, "events": stream.events, "state": state}


async def assert_intact(client: TestClient[Any, Any], stored: dict[str, Any]) -> None:
    session_id = stored["created"]["id"]
    again = await read_stream(client, session_id)
    assert again.status == 200
    assert_well_formed(again.events)
    assert [(e.id, e.type, e.data) for e in again.events] == [(e.id, e.type, e.data) for e in stored["events"]]
    assert await get_session(client, session_id) == stored["state"]
    # and the service still takes good work
    fresh = await create_session(client, "still alive?")
    assert text_of((await wait_terminal(client, fresh["id"])).events)


@pytest.mark.parametrize(("body", "content_type", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_post_sessions(
    client: TestClient[Any, Any],
    stored: dict[str, Any],
    body: bytes,
    content_type: str | None,
    status: int | set[int],
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    skip = ["Content-Type"] if content_type is None else []
    resp = await client.post("/sessions", data=body, headers=headers, skip_auto_headers=skip)
    await assert_problem(resp, status)
    await assert_intact(client, stored)


async def test_chunked_body_over_limit_is_413(client: TestClient[Any, Any], stored: dict[str, Any]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"message": "hi", "pad": "'
        for _ in range(MAX_BODY // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    resp = await client.post(
        "/sessions", data=payload.AsyncIterablePayload(chunks()), headers={"Content-Type": JSON}
    )
    await assert_problem(resp, 413)
    await assert_intact(client, stored)


GOOD = [
    ("exact-limit", json.dumps({"message": "x" * MAX_CHARS})),
    ("multibyte-at-limit", json.dumps({"message": "\u00e9" * MAX_CHARS}, ensure_ascii=False)),
    ("astral-at-limit", json.dumps({"message": "\U0001f600" * MAX_CHARS}, ensure_ascii=False)),
    ("escaped-pair", '{"message": "smile \\ud83d\\ude00"}'),
    ("charset-param", '{"message": "hi"}'),
    ("line-separators", json.dumps({"message": "a\u2028b\u2029c\u0085d"})),
]


@pytest.mark.parametrize(("body",), [(g[1],) for g in GOOD], ids=[g[0] for g in GOOD])
async def test_good_edge_inputs_are_accepted(client: TestClient[Any, Any], body: str) -> None:
    resp = await client.post(
        "/sessions", data=body.encode(), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    text = await resp.text()
    assert resp.status == 201, text
    created = json.loads(text)
    assert (await wait_terminal(client, created["id"])).events[-1].type == "done"


# Inputs whose exact status the contract leaves open: never 5xx, and an error is always a problem.
ODD = [
    ("nul-in-message", json.dumps({"message": "a\u0000b"})),
    ("controls-in-message", json.dumps({"message": "a\u0001\u001b[31mb"})),
    ("bidi-override", json.dumps({"message": "\u202eabc"})),
    ("noncharacter", json.dumps({"message": "\uffff\ufffe"})),
    ("duplicate-key", '{"message": "a", "message": "b"}'),
    ("extra-field", '{"message": "hi", "model": "gpt-x", "stream": true}'),
    ("bom-prefixed", "\ufeff" + '{"message": "hi"}'),
    ("long-key", json.dumps({"message": "hi", "k" * 3000: 1})),
]


@pytest.mark.parametrize(("body",), [(o[1],) for o in ODD], ids=[o[0] for o in ODD])
async def test_odd_inputs_never_5xx(client: TestClient[Any, Any], stored: dict[str, Any], body: str) -> None:
    resp = await client.post("/sessions", data=body.encode(), headers={"Content-Type": JSON})
    if resp.status >= 400:
        await assert_problem(resp, set(range(400, 500)))
    else:
        assert resp.status == 201
        created = await resp.json()
        await wait_terminal(client, created["id"])
    await assert_intact(client, stored)


BAD_PATHS = [
    ("GET", "/events/" + "A" * 2000),
    ("GET", "/events/%00"),
    ("GET", "/events/..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/events/%F0%9F%98%80"),
    ("GET", "/sessions/" + "B" * 2000),
    ("GET", "/sessions/*"),
    ("POST", "/sessions/%2A/cancel"),
    ("GET", "/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), BAD_PATHS)
async def test_bad_paths_are_404_problems(
    client: TestClient[Any, Any], stored: dict[str, Any], method: str, path: str
) -> None:
    from yarl import URL

    resp = await client.request(method, URL(path, encoded=True))
    await assert_problem(resp, 404)
    await assert_intact(client, stored)


@pytest.mark.parametrize(("method", "path"), [("GET", "/sessions"), ("PUT", "/sessions"), ("DELETE", "/healthz")])
async def test_wrong_method_is_405_problem(client: TestClient[Any, Any], method: str, path: str) -> None:
    resp = await client.request(method, path)
    await assert_problem(resp, 405)
    assert resp.headers.get("Allow")


async def test_bad_last_event_id_keeps_session(client: TestClient[Any, Any], stored: dict[str, Any]) -> None:
    session_id = stored["created"]["id"]
    for bad in ["nope", "1-0-0", "99999999999999999999999-0", "-", "$"]:
        resp = await client.get(f"/events/{session_id}", params={"last_event_id": bad})
        await assert_problem(resp, 400)
    await assert_intact(client, stored)
