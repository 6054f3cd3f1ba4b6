"""The chat widget in Chromium against the real service: streaming, reload, dropped connections, stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import (
    RECORD_STATUSES_JS,
    ScriptedProvider,
    StartService,
    ask,
    normalized,
    screenshot,
    shown_text,
    stored_message,
    wait_status,
)
from .cutting_proxy import CuttingProxy

TERMINAL = {"done", "cancelled", "error"}


def _redis_url(store: str, request: pytest.FixtureRequest) -> str | None:
    """The real redis-server for the "redis" run of a test parametrized by the `store` fixture."""
    if store != "redis":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


async def sample(page: Any, session_id: str, *, until: set[str], within: float = 15) -> list[tuple[str, str]]:
    """Poll the answer's (data-status, shown text) until its status is one of `until`."""
    message = page.locator(f'[data-testid="assistant-message"][data-session-id="{session_id}"]')
    samples: list[tuple[str, str]] = []
    async with asyncio.timeout(within):
        while True:
            status, text = await message.evaluate("(m) => [m.dataset.status, m.querySelector('.body').textContent]")
            samples.append((status, normalized(text)))
            if status in until:
                return samples
            await asyncio.sleep(0.03)


async def test_answer_streams_visibly_before_it_is_done(start_service: StartService, page: Any) -> None:
    service = await start_service()
    await page.goto(service.url("/"))

    session_id = await ask(page, "How should I start a small project")
    samples = await sample(page, session_id, until=TERMINAL)

    final = await service.session(session_id)
    whole = normalized(final["text"])
    assert final["status"] == "done"
    assert samples[-1] == ("done", whole)
    partial = [text for status, text in samples if status == "streaming" and 0 < len(text) < len(whole)]
    assert len(partial) >= 3, f"no partial text seen while streaming: {samples}"
    assert all(whole.startswith(text) for text in partial)
    assert (await stored_message(page, session_id))["text"] == final["text"]
    await screenshot(page, "streamed")


async def test_reload_mid_answer_completes_the_same_answer_once(
    start_service: StartService, page: Any, store: str, request: pytest.FixtureRequest
) -> None:
    service = await start_service(redis_url=_redis_url(store, request))
    await page.goto(service.url("/"))
    session_id = await ask(page, "Tell me about reloading pages")
    before = await _wait_for_text(page, session_id, words=8)

    event_urls: list[str] = []
    page.on("request", lambda request: event_urls.append(request.url) if "/events/" in request.url else None)
    await page.reload()
    # Straight after the reload the partial answer is back from storage, not restarted.
    assert (await shown_text(page, session_id)).startswith(before)
    await wait_status(page, session_id, "done")

    final = await service.session(session_id)
    assert final["status"] == "done"
    assert await page.locator(f'[data-session-id="{session_id}"]').count() == 1
    assert (await stored_message(page, session_id))["text"] == final["text"]
    assert await shown_text(page, session_id) == normalized(final["text"])
    assert event_urls and all("last_event_id=" in url for url in event_urls), event_urls
    await screenshot(page, "after-reload")


async def test_cut_connections_resume_with_last_event_id(
    start_service: StartService, page: Any, store: str, request: pytest.FixtureRequest
) -> None:
    service = await start_service(redis_url=_redis_url(store, request))
    proxy = CuttingProxy(service.server.port or 0, cut_after=0.3)
    await proxy.start()
    try:
        await page.goto(f"http://127.0.0.1:{proxy.port}/")
        await page.evaluate(RECORD_STATUSES_JS)
        session_id = await ask(page, "What happens when the network drops")
        await wait_status(page, session_id, "done", within_ms=30_000)

        final = await service.session(session_id)
        assert final["status"] == "done"
        assert proxy.cuts >= 3, proxy.cuts
        assert len(proxy.resumed_requests) >= 3, proxy.events_requests
        statuses = [s["status"] for s in await page.evaluate("window.__statuses") if s["id"] == session_id]
        assert "reconnecting" in statuses, statuses
        assert (await stored_message(page, session_id))["text"] == final["text"]
        assert await shown_text(page, session_id) == normalized(final["text"])
    finally:
        await proxy.close()


async def test_stop_after_reload_cancels_the_answer(start_service: StartService, page: Any) -> None:
    service = await start_service(demo_tokens_per_second=15.0)
    await page.goto(service.url("/"))
    session_id = await ask(page, "Write a very long essay")
    await _wait_for_text(page, session_id, words=3)
    await page.reload()
    await _wait_for_text(page, session_id, words=6)

    await page.get_by_test_id("chat-stop").click()
    await wait_status(page, session_id, "cancelled")

    final = await service.session(session_id)
    assert final["status"] == "cancelled"
    stored = await stored_message(page, session_id)
    assert stored["status"] == "cancelled"
    assert stored["text"] == final["text"]
    assert len(final["text"].split()) < 60  # it really stopped early
    # Keyboard users are not stranded on the vanished Stop button.
    assert await page.get_by_test_id("chat-input").evaluate("(el) => el.getRootNode().activeElement === el")
    assert await page.get_by_test_id("chat-send").is_visible()
    await screenshot(page, "cancelled")


async def test_expired_conversation_starts_a_new_one(start_service: StartService, page: Any) -> None:
    service = await start_service(demo_answer_tokens=5)
    await page.goto(service.url("/"))
    await page.get_by_test_id("chat-input").wait_for()  # the widget's modules have loaded and saved its state
    await page.evaluate(
        """() => {
          const key = Object.keys(localStorage).find((k) => k.startsWith("chatbot-widget:v1:"));
          const state = JSON.parse(localStorage.getItem(key));
          state.conversationId = "A".repeat(22);  // well-formed, but unknown to the service
          localStorage.setItem(key, JSON.stringify(state));
        }"""
    )
    await page.reload()
    await page.get_by_test_id("chat-input").fill("Continue where we were")
    await page.get_by_test_id("chat-send").click()
    refused = page.locator('[data-testid="assistant-message"][data-status="error"]')
    await refused.wait_for()
    assert "start a new conversation" in await refused.inner_text()

    session_id = await ask(page, "Continue where we were")
    await wait_status(page, session_id, "done")
    assert (await service.session(session_id))["conversation_id"] != "A" * 22


async def test_resume_answered_204_shows_the_final_text(start_service: StartService, page: Any) -> None:
    service = await start_service(demo_answer_tokens=10)
    await page.goto(service.url("/"))
    session_id = await ask(page, "Finish before I come back")
    await wait_status(page, session_id, "done")
    async with service.http.get(service.url(f"/events/{session_id}")) as response:
        ids = [line.split(":", 1)[1].strip() for line in (await response.text()).splitlines() if line.startswith("id:")]
    # A stored answer that had every event but still says "streaming" (the tab died between the
    # `done` and its save): resuming after the terminal id is answered 204 and the EventSource closes.
    await page.evaluate(
        """([sessionId, lastId]) => {
          const key = Object.keys(localStorage).find((k) => k.startsWith("chatbot-widget:v1:"));
          const state = JSON.parse(localStorage.getItem(key));
          const msg = state.messages.find((m) => m.sessionId === sessionId);
          Object.assign(msg, {status: "streaming", lastEventId: lastId, text: "stale"});
          localStorage.setItem(key, JSON.stringify(state));
        }""",
        [session_id, ids[-1]],
    )
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/events/" in r.url else None)
    await page.reload()
    await wait_status(page, session_id, "done")
    final = await service.session(session_id)
    assert statuses == [204]
    assert (await stored_message(page, session_id))["text"] == final["text"]
    assert await shown_text(page, session_id) == normalized(final["text"])


async def test_retryable_error_offers_try_again(start_service: StartService, page: Any) -> None:
    question, answer = "Are you there?", "Yes, **here** now."
    service = await start_service(provider=ScriptedProvider({question: answer}, failures=1))
    await page.goto(service.url("/"))
    failed = await ask(page, question)
    await wait_status(page, failed, "error")
    message = page.locator(f'[data-session-id="{failed}"]')
    assert "overloaded" in await message.inner_text()
    assert (await service.session(failed))["status"] == "failed"

    await message.get_by_test_id("chat-retry").press("Enter")  # keyboard, like any button
    answers = page.get_by_test_id("assistant-message")
    await page.locator('[data-testid="assistant-message"][data-status="done"]').wait_for()
    assert await answers.count() == 1  # the failed answer is replaced, not kept beside the new one
    assert await page.locator(".msg.user").count() == 1  # the question is not repeated
    retried = await answers.get_attribute("data-session-id") or ""
    assert retried != failed
    assert (await stored_message(page, retried))["text"] == answer == (await service.session(retried))["text"]
    assert await shown_text(page, retried) == "Yes, here now."


async def test_two_tabs_share_one_conversation(start_service: StartService, page: Any) -> None:
    service = await start_service(demo_answer_tokens=20)
    other = await page.context.new_page()
    await page.goto(service.url("/"))
    await other.goto(service.url("/"))

    first = await ask(page, "Asked in the first tab")
    await wait_status(page, first, "done")
    await wait_status(other, first, "done")  # followed through the first tab's saves
    assert await shown_text(other, first) == await shown_text(page, first)

    second = await ask(other, "Followed up in the second tab")
    await wait_status(other, second, "done")
    await wait_status(page, second, "done")
    assert (await service.session(second))["conversation_id"] == (await service.session(first))["conversation_id"]
    for tab in (page, other):
        assert await tab.get_by_test_id("assistant-message").count() == 2


FAKE_VISIBILITY_JS = """() => {
  let state = "visible";
  Object.defineProperty(document, "visibilityState", {configurable: true, get: () => state});
  Object.defineProperty(document, "hidden", {configurable: true, get: () => state === "hidden"});
  window.__setVisibility = (next) => {
    state = next;
    document.dispatchEvent(new Event("visibilitychange"));
  };
}"""


async def test_tab_becoming_visible_revives_a_stalled_stream(start_service: StartService, page: Any) -> None:
    service = await start_service()
    proxy = CuttingProxy(service.server.port or 0, cut_after=None)
    await proxy.start()
    try:
        await page.goto(f"http://127.0.0.1:{proxy.port}/")
        await page.evaluate(FAKE_VISIBILITY_JS)
        session_id = await ask(page, "What happens when my phone sleeps")
        await _wait_for_text(page, session_id, words=5)

        await page.evaluate("__setVisibility('hidden')")
        assert proxy.stall_open_streams() == 1
        async with asyncio.timeout(10):
            while True:
                if (await service.session(session_id))["status"] == "done":
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        # The connection still looks open, yet the answer is stuck: the "loading dots forever" state.
        stuck = await stored_message(page, session_id)
        assert stuck["status"] == "streaming"
        assert len(proxy.events_requests) == 1

        await page.evaluate("__setVisibility('visible')")
        await wait_status(page, session_id, "done", within_ms=5000)
        final = await service.session(session_id)
        assert (await stored_message(page, session_id))["text"] == final["text"]
        assert await shown_text(page, session_id) == normalized(final["text"])
        assert len(proxy.events_requests) == 2
        assert b"last_event_id=" in proxy.events_requests[1].split(b"\r\n", 1)[0]
    finally:
        await proxy.close()


async def _wait_for_text(page: Any, session_id: str, *, words: int, within: float = 10) -> str:
    """Wait until the streaming answer shows at least `words` words; return what it shows."""
    async with asyncio.timeout(within):
        while True:
            text = await shown_text(page, session_id)
            if len(text.split()) >= words:
                return text
            await asyncio.sleep(0.03)
