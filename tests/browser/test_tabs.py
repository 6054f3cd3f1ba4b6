"""Several tabs of one site: one leader tab holds the one event stream and relays it to the others."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import WATCH_JS, Service, StartService, normalized, screenshot, shown_text, wait_status

SEED_JS = """([key, turns]) => {
  const messages = [];
  for (let i = 0; i < turns; i++) {
    messages.push({id: "u" + i, role: "user", text: "Earlier question " + i});
    messages.push({id: "a" + i, role: "assistant", sessionId: "old" + i, status: "done",
                   text: "Earlier answer " + i + ". " + "Enough words to fill the panel. ".repeat(10)});
  }
  localStorage.setItem(key, JSON.stringify({conversationId: null, open: true, messages}));
}"""

# Where each tab's reader was (what it announced: WATCH_JS).
TAB_ROLE_JS = '() => document.querySelector(".chatbot-widget-host")?.dataset.tab || ""'
SCROLL_JS = '() => document.querySelector(".chatbot-widget-host").shadowRoot.querySelector(".log").scrollTop'
AT_BOTTOM_JS = """() => {
  const log = document.querySelector(".chatbot-widget-host").shadowRoot.querySelector(".log");
  return log.scrollTop + log.clientHeight >= log.scrollHeight - 2;
}"""


@contextlib.asynccontextmanager
async def open_streams_watch(service: Service) -> AsyncIterator[list[int]]:
    """Sample the service's open event streams (its /metrics gauge) while the block runs."""
    samples: list[int] = []

    async def sample() -> None:
        while True:
            async with service.http.get(service.url("/metrics")) as response:
                found = re.search(r"^chatbot_open_streams (\S+)$", await response.text(), re.M)
                assert found, "no chatbot_open_streams gauge"
                samples.append(int(float(found.group(1))))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def open_tabs(browser: Any, service: Service, count: int) -> tuple[Any, list[Any], list[str]]:
    """`count` tabs of the demo page in one browser profile, the first one the leader; /events/ URLs seen."""
    context = await browser.new_context(viewport={"width": 900, "height": 700})
    events: list[str] = []
    context.on("request", lambda r: events.append(r.url) if "/events/" in r.url else None)
    tabs = []
    for i in range(count):
        tab = await context.new_page()
        await tab.goto(service.url("/"))
        if i == 0:
            await tab.evaluate(SEED_JS, [f"chatbot-widget:v1:{service.url('/')}", 6])
            await tab.reload()
        await tab.evaluate(WATCH_JS)
        await tab.get_by_test_id("assistant-message").nth(5).wait_for()
        tabs.append(tab)
    for i, tab in enumerate(tabs):
        expected = "leader" if i == 0 else "follower"
        await tab.wait_for_function(f"() => ({TAB_ROLE_JS})() === {expected!r}", timeout=5000)
    return context, tabs, events


async def send_from(tab: Any, question: str) -> str:
    before = await tab.get_by_test_id("assistant-message").count()
    box = tab.get_by_test_id("chat-input")
    await box.fill(question)
    await box.press("Enter")
    answer = tab.get_by_test_id("assistant-message").nth(before)
    await answer.wait_for()
    session_id: str = await answer.get_attribute("data-session-id") or ""
    assert session_id
    return session_id


@pytest.mark.parametrize("count, asker", [(2, 0), (2, 1), (3, 2)])
async def test_one_stream_for_all_tabs(start_service: StartService, browser: Any, count: int, asker: int) -> None:
    service = await start_service(demo_answer_tokens=50)
    context, tabs, events = await open_tabs(browser, service, count)
    try:
        before = [await tab.evaluate(SCROLL_JS) for tab in tabs]
        async with open_streams_watch(service) as streams:
            session_id = await send_from(tabs[asker], "One answer for every tab")
            for tab in tabs:
                await wait_status(tab, session_id, "done")
        final = normalized((await service.session(session_id))["text"])
        assert max(streams) == 1, streams  # one connection on the service, whatever the number of tabs
        assert len(events) == 1, events
        for i, tab in enumerate(tabs):
            assert await shown_text(tab, session_id) == final, i  # whole, and once
            assert await tab.locator(f'[data-session-id="{session_id}"]').count() == 1
            said = await tab.evaluate("window.__said")
            if i == asker:
                assert said.count("Answer complete.") == 1, said
                assert await tab.evaluate(AT_BOTTOM_JS)  # the asking tab follows the answer down
            else:
                assert said == [], said  # the other tabs say nothing
                assert await tab.evaluate(SCROLL_JS) == before[i]  # and never move their reader
        await screenshot(tabs[asker], f"tabs-{count}-asker")
    finally:
        await context.close()


@pytest.mark.parametrize("asker", [0, 1])
async def test_leader_closed_mid_answer_another_tab_resumes(
    start_service: StartService, browser: Any, asker: int
) -> None:
    service = await start_service(demo_answer_tokens=80, demo_tokens_per_second=25.0)
    context, tabs, events = await open_tabs(browser, service, 3)
    try:
        async with open_streams_watch(service) as streams:
            session_id = await send_from(tabs[asker], "Keep going when the leader closes")
            await tabs[2].wait_for_function(
                """(id) => document.querySelector(".chatbot-widget-host").shadowRoot
                  .querySelector(`[data-session-id="${id}"] .body`).textContent.split(" ").length > 10""",
                arg=session_id,
            )
            await tabs[0].close()  # the leader goes away mid-answer
            rest = tabs[1:]
            for tab in rest:
                await wait_status(tab, session_id, "done", within_ms=20_000)
        final = await service.session(session_id)
        assert final["status"] == "done"
        assert max(streams) == 1, streams
        assert len(events) == 2, events
        assert "last_event_id=" in events[1], events
        roles = sorted([await tab.evaluate(TAB_ROLE_JS) for tab in rest])
        assert roles == ["follower", "leader"]
        for tab in rest:
            assert await shown_text(tab, session_id) == normalized(final["text"])
            assert await tab.locator(f'[data-session-id="{session_id}"]').count() == 1
        # A reload of a follower now shows the stored answer, whole.
        await rest[0].reload()
        await wait_status(rest[0], session_id, "done")
        assert await shown_text(rest[0], session_id) == normalized(final["text"])
    finally:
        await context.close()


async def test_a_follow_up_from_any_tab_continues_the_conversation(start_service: StartService, browser: Any) -> None:
    service = await start_service(demo_answer_tokens=15)
    context, tabs, events = await open_tabs(browser, service, 2)
    try:
        first = await send_from(tabs[1], "Asked in the follower")
        await wait_status(tabs[0], first, "done")
        second = await send_from(tabs[0], "Followed up in the leader")
        await wait_status(tabs[1], second, "done")
        conversation = (await service.session(first))["conversation_id"]
        assert (await service.session(second))["conversation_id"] == conversation
        for tab in tabs:
            assert await tab.get_by_test_id("assistant-message").count() == 8
        assert len(events) == 2
    finally:
        await context.close()


async def test_without_web_locks_each_tab_streams_for_itself(start_service: StartService, browser: Any) -> None:
    """An origin without Web Locks (plain http on a public host): no leader, each tab its own stream."""
    service = await start_service(demo_answer_tokens=20)
    context = await browser.new_context()
    await context.add_init_script("delete Navigator.prototype.locks;")
    events: list[str] = []
    context.on("request", lambda r: events.append(r.url) if "/events/" in r.url else None)
    try:
        tabs = [await context.new_page() for _ in range(2)]
        for tab in tabs:
            await tab.goto(service.url("/"))
            await tab.get_by_test_id("chat-input").wait_for()
        session_id = await send_from(tabs[0], "No locks here")
        final = ""
        for tab in tabs:
            await wait_status(tab, session_id, "done")
            final = normalized((await service.session(session_id))["text"])
            assert await shown_text(tab, session_id) == final
        assert len(events) == 2, events
        await tabs[1].get_by_test_id("chat-new").click()
        await tabs[0].get_by_text("Ask a question to start.").wait_for()
    finally:
        await context.close()
