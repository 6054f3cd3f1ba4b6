"""The widget's side of the shared event contract: `reasoning`, `sources`, `content_filter`, new error codes.

The service's side is built by other issues; until it emits these events, a fake of the service's exact
wire format (chatbot.events.frame) serves the widget's real files and streams the contract's events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatbot.events import Event, done_data, error_data, frame, retry_field, token_data
from chatbot.settings import Settings
from chatbot.web import WEB_ROOT, setup_web

from .conftest import WATCH_JS, ask, screenshot, shown_text, wait_status

ANSWER = "The answer, with **markdown**."
REASONING = ["First I look at the question. ", "Then I <b>check</b> sources."]
SOURCES = [
    {"title": "Redis <streams> docs", "url": "https://redis.io/docs/data-types/streams/"},
    {"title": "Bad", "url": "javascript:alert(1)"},
    {"title": "", "url": "http://127.0.0.1:9/plain"},
    {"title": "Not a URL", "url": "nope"},
]
SCRIPTS: dict[str, list[tuple[str, str]]] = {
    "reasoning": [
        *(("reasoning", json.dumps({"text": t})) for t in REASONING),
        ("sources", json.dumps({"sources": SOURCES})),
        ("token", token_data("The answer, ")),
        ("token", token_data("with **markdown**.")),
        ("done", done_data("stop")),
    ],
    "filter": [("token", token_data("Part of an answer")), ("done", done_data("content_filter"))],
    "bad": [("error", error_data("upstream_bad_response", "", retryable=False))],
    "empty": [("error", error_data("empty_answer", "", retryable=True))],
    "internal": [("error", error_data("internal_error", "The service failed; try again.", retryable=True))],
}


async def fake_service() -> TestServer:
    """The widget's files and a service that streams the scripted events of the question asked."""
    app = web.Application()
    ids = itertools.count(1)
    asked: dict[str, str] = {}

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        session_id = f"s{next(ids)}"
        asked[session_id] = body["message"]
        return web.json_response({"id": session_id, "conversation_id": "c1", "events_url": f"/events/{session_id}"})

    async def events(request: web.Request) -> web.StreamResponse:
        script = SCRIPTS[asked[request.match_info["id"]]]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(retry_field(1000))
        for seq, (name, data) in enumerate(script, start=1):
            await asyncio.sleep(0.05)
            await response.write(frame(Event(f"1000-{seq}", name, data)))
        return response

    async def session(request: web.Request) -> web.Response:
        script = SCRIPTS[asked[request.match_info["id"]]]
        text = "".join(json.loads(d)["text"] for n, d in script if n == "token")
        reasoning = "".join(json.loads(d)["text"] for n, d in script if n == "reasoning")
        return web.json_response({"status": "done", "text": text, "reasoning": reasoning, "sources": SOURCES})

    app.router.add_post("/sessions", create)
    app.router.add_get("/events/{id}", events)
    app.router.add_get("/sessions/{id}", session)
    setup_web(app, Settings(), root=WEB_ROOT)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[], Awaitable[TestServer]]]:
    servers: list[TestServer] = []

    async def start() -> TestServer:
        servers.append(await fake_service())
        return servers[-1]

    yield start
    for server in servers:
        await server.close()


async def test_reasoning_folds_above_and_sources_link_below(fake: Any, page: Any) -> None:
    server = await fake()
    await page.goto(str(server.make_url("/")))
    await page.evaluate(WATCH_JS)
    session_id = await ask(page, "reasoning")
    await wait_status(page, session_id, "done")
    message = page.locator(f'[data-session-id="{session_id}"]')
    await screenshot(page, "reasoning-sources")
    for attempt in ("live", "after reload"):
        layout = await message.evaluate(
            """(m) => [...m.children].map((c) => c.localName + (c.className ? "." + c.className : ""))"""
        )
        assert layout[:3] == ["details.reasoning", "div.body", "nav.sources"], (attempt, layout)
        details = message.locator("details.reasoning")
        assert await details.get_attribute("open") is None  # folded
        assert await details.locator("summary").inner_text() == "Thinking\u2026"
        reasoning = message.locator("details.reasoning > div.reasoning-text")
        assert await reasoning.get_attribute("dir") == "auto"
        assert await reasoning.text_content() == "".join(REASONING)  # as text: the <b> is not a tag
        assert await shown_text(page, session_id) == "The answer, with markdown."  # never part of the answer
        nav = message.locator('nav.sources[aria-label="Sources"] > ul > li > a')
        assert await nav.count() == 2  # only http and https
        assert [await a.text_content() for a in await nav.all()] == [
            "Redis <streams> docs",
            "http://127.0.0.1:9/plain",
        ]
        for a in await nav.all():
            assert await a.get_attribute("target") == "_blank"
            assert await a.get_attribute("rel") == "noopener noreferrer"
        assert await nav.first.get_attribute("href") == SOURCES[0]["url"]
        if attempt == "live":
            said = await page.evaluate("window.__said")
            assert said.count("Thinking\u2026") == 1 and said.count("Answer complete.") == 1, said
            await page.reload()
            await wait_status(page, session_id, "done")


@pytest.mark.parametrize(
    "case, note, retry",
    [
        ("filter", "cut short by the provider's content filter", False),
        ("bad", "could not be read", False),
        ("empty", "empty answer", True),
        ("internal", "The service failed; try again.", True),
    ],
)
async def test_finish_reasons_and_error_codes(fake: Any, page: Any, case: str, note: str, retry: bool) -> None:
    server = await fake()
    await page.goto(str(server.make_url("/")))
    session_id = await ask(page, case)
    await wait_status(page, session_id, "done" if case == "filter" else "error")
    message = page.locator(f'[data-session-id="{session_id}"]')
    assert note in await message.locator(".note").inner_text()
    assert await message.get_by_test_id("chat-retry").is_visible() == retry
    if case == "filter":
        assert await shown_text(page, session_id) == "Part of an answer"
