"""Fixtures for the widget's browser tests: the real app in-process, Chromium, and page helpers."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatbot.app import create_app
from chatbot.providers import Finish, Message, Provider, ProviderError
from chatbot.settings import Settings

# On a developer's machine without a browser these tests skip; in CI (CI=true) a missing one is a failure,
# so that a green run always includes them.
if os.environ.get("CI") == "true":
    import playwright.async_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.async_api")
Browser = playwright_api.Browser
Page = playwright_api.Page

CHROMIUM = os.environ.get("CHATBOT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"

# A slowish demo so a test can act while an answer is still streaming: about 2 s per answer.
SLOW_DEMO = {"demo_tokens_per_second": 30.0, "demo_answer_tokens": 60, "sse_retry_ms": 100}

if shutil.which(CHROMIUM) is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs Chromium at {CHROMIUM}; .ci/run installs Debian's chromium")
    pytest.skip(f"no Chromium at {CHROMIUM} (set CHATBOT_TEST_CHROMIUM)", allow_module_level=True)


@dataclass
class Service:
    """The service under test, listening on 127.0.0.1."""

    server: TestServer
    http: aiohttp.ClientSession

    def url(self, path: str = "/") -> str:
        return str(self.server.make_url(path))

    async def session(self, session_id: str) -> dict[str, Any]:
        async with self.http.get(self.url(f"/sessions/{session_id}")) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start the real app; keyword arguments override Settings, `provider=` swaps the model."""
    running: list[Service] = []

    async def start(*, provider: Provider | None = None, **overrides: Any) -> Service:
        settings = Settings(**{**SLOW_DEMO, **overrides})
        server = TestServer(create_app(settings, provider=provider), host="127.0.0.1", port=0)
        await server.start_server()
        service = Service(server, aiohttp.ClientSession())
        running.append(service)
        return service

    yield start
    for service in running:
        await service.http.close()
        await service.server.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1100, "height": 760})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


class ScriptedProvider:
    """A model with canned answers, keyed by the question, streamed in small pieces at a pace."""

    name = "scripted"

    def __init__(
        self, answers: dict[str, str], *, piece_chars: int = 7, delay: float = 0.01, failures: int = 0
    ) -> None:
        self.answers = answers
        self.piece_chars = piece_chars
        self.delay = delay
        self.failures = failures  # the first calls that fail half-way with a retryable error

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        answer = self.answers[messages[-1].content]
        if self.failures > 0:
            self.failures -= 1
            yield answer[: self.piece_chars]
            raise ProviderError("upstream_overloaded", "The model is overloaded; try again.", retryable=True)
        for start in range(0, len(answer), self.piece_chars):
            await asyncio.sleep(self.delay)
            yield answer[start : start + self.piece_chars]
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


# ---- page helpers: the widget lives in an open shadow root; Playwright locators pierce it ----

WIDGET_STATE_JS = """() => {
  const key = Object.keys(localStorage).find((k) => k.startsWith("chatbot-widget:v1:"));
  return key ? JSON.parse(localStorage.getItem(key)) : null;
}"""

# Records every data-status an assistant message takes, with the text shown at that moment.
RECORD_STATUSES_JS = """async () => {
  window.__statuses = [];
  let host;  // the widget's modules load after the page: wait for its host element
  while (!(host = document.querySelector(".chatbot-widget-host"))) await new Promise((r) => setTimeout(r, 20));
  const root = host.shadowRoot;
  const seen = (node) => window.__statuses.push(
    {status: node.dataset.status, id: node.dataset.sessionId, text: node.querySelector(".body").textContent});
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.dataset && r.target.dataset.testid === "assistant-message") seen(r.target);
      for (const n of r.addedNodes || []) if (n.dataset && n.dataset.testid === "assistant-message") seen(n);
    }
  }).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ["data-status"]});
}"""


async def widget_state(page: Any) -> dict[str, Any]:
    """The conversation the widget persisted: raw model text, ids, statuses."""
    state = await page.evaluate(WIDGET_STATE_JS)
    assert state is not None, "the widget saved no state"
    result: dict[str, Any] = state
    return result


async def assistant(page: Any, session_id: str | None = None) -> Any:
    selector = '[data-testid="assistant-message"]'
    if session_id:
        selector += f'[data-session-id="{session_id}"]'
    return page.locator(selector)


async def ask(page: Any, question: str) -> str:
    """Type a question with the keyboard, send it, and return the new answer's session id."""
    before = await page.locator('[data-testid="assistant-message"]').count()
    await page.get_by_test_id("chat-input").fill(question)
    await page.get_by_test_id("chat-send").click()
    message = page.locator('[data-testid="assistant-message"]').nth(before)
    await message.wait_for()
    session_id: str = await message.get_attribute("data-session-id") or ""
    assert session_id, "the answer has no session id"
    return session_id


# Installs a recorder of everything the widget's status region announces, in `window.__said`.
WATCH_JS = """async () => {
  let host;
  while (!(host = document.querySelector(".chatbot-widget-host"))) await new Promise((r) => setTimeout(r, 20));
  const status = host.shadowRoot.querySelector('[role="status"]');
  window.__said = [];
  new MutationObserver(() => status.textContent && window.__said.push(status.textContent))
    .observe(status, {childList: true, characterData: true, subtree: true});
}"""


async def wait_status(page: Any, session_id: str, *statuses: str, within_ms: float = 15_000) -> None:
    selector = ", ".join(
        f'[data-testid="assistant-message"][data-session-id="{session_id}"][data-status="{s}"]' for s in statuses
    )
    await page.locator(selector).wait_for(timeout=within_ms)


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


async def shown_text(page: Any, session_id: str) -> str:
    body = page.locator(f'[data-testid="assistant-message"][data-session-id="{session_id}"] .body')
    return normalized(await body.inner_text())


async def stored_message(page: Any, session_id: str) -> dict[str, Any]:
    state = await widget_state(page)
    matches = [m for m in state["messages"] if m.get("sessionId") == session_id]
    assert len(matches) == 1, f"expected one stored answer for {session_id}, got {matches}"
    message: dict[str, Any] = matches[0]
    return message


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


EMBED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Someone else's site</title></head>
<body><h1>A shop that embeds the chat</h1><p>No CSP on this page: the widget must be safe on its own.</p>
<script src="{src}" defer{extra}></script></body></html>"""


@dataclass
class Site:
    """Another origin (http://localhost:<port>) whose page embeds the widget with its script tag."""

    server: TestServer
    widget_src: str = ""
    open_panel: bool = True

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.server.port}"

    def url(self) -> str:
        return f"{self.origin}/"

    def page_html(self) -> str:
        return EMBED_PAGE.format(src=self.widget_src, extra=' data-open="true"' if self.open_panel else "")


@pytest.fixture
async def start_site() -> AsyncIterator[Callable[[], Awaitable[Site]]]:
    """Start a second site; set its `widget_src` once the service runs (its origin goes in CORS first)."""
    servers: list[TestServer] = []

    async def start() -> Site:
        app = web.Application()
        site = Site(TestServer(app, host="127.0.0.1", port=0))

        async def index(request: web.Request) -> web.Response:
            return web.Response(text=site.page_html(), content_type="text/html")

        app.router.add_get("/", index)
        await site.server.start_server()
        servers.append(site.server)
        return site

    yield start
    for server in servers:
        await server.close()
