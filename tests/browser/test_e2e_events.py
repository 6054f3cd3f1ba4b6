"""End to end in Chromium: the demo page's widget, the real service, and a fake OpenAI-compatible upstream.

tests/browser/test_contract_events.py checks the widget against a fake of the service; here every layer is
real except the model: its exact Chat Completions wire format comes from tests/providers_fakes.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from chatbot.app import create_app
from chatbot.settings import Settings
from tests.providers_fakes import FakeUpstream, Reply, openai_events

from .conftest import Service, ask, normalized, screenshot, shown_text, stored_message, wait_status

pytestmark = pytest.mark.timeout(90)

StartE2E = Callable[..., Awaitable[Service]]

# Reasoning and answer with characters a byte-wise decoder or an HTML renderer would get wrong.
REASONING = ["The visitor asks ", "about café hours; ", "<b>not</b> a tag, ", "check the sign — ", "done."]
ANSWER = ["We open ", "at nine ", "and close ", "at five, ", "every day ", "but Sunday."]
FILTER_NOTE = "The answer was cut short by the provider's content filter."


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    """One Chat Completions chunk, as DeepSeek and vLLM write reasoning models' output."""
    body = {
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def reasoning_then_answer(reasoning: Sequence[str], answer: Sequence[str]) -> list[bytes]:
    """`reasoning_content` deltas, then `content` deltas, then the finish and `[DONE]`."""
    pieces = [chunk({"role": "assistant", "content": None, "reasoning_content": ""})]
    pieces += [chunk({"content": None, "reasoning_content": r}) for r in reasoning]
    pieces += [chunk({"content": a, "reasoning_content": None}) for a in answer]
    return [*pieces, chunk({}, "stop"), b"data: [DONE]\n\n"]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def start_e2e(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartE2E]:
    """The real app configured as an operator would, CHATBOT_PROVIDER=openai; `env` adds CHATBOT_* variables.

    The OpenAI SDK finds the fake upstream through its own OPENAI_BASE_URL, as it would a real endpoint.
    """
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    running: list[Service] = []

    async def start(*replies: Reply, env: dict[str, str] | None = None) -> Service:
        upstream.script(*replies)
        variables = {"CHATBOT_PROVIDER": "openai", "CHATBOT_MODEL": "fake-model", "CHATBOT_SSE_RETRY_MS": "100"}
        settings = Settings.from_env({**variables, **(env or {})})
        server = TestServer(create_app(settings), host="127.0.0.1", port=0)
        await server.start_server()
        running.append(Service(server, aiohttp.ClientSession()))
        return running[-1]

    yield start
    for service in running:
        await service.http.close()
        await service.server.close()


def message_of(page: Any, session_id: str) -> Any:
    return page.locator(f'[data-testid="assistant-message"][data-session-id="{session_id}"]')


async def assert_reasoning_and_answer(page: Any, session_id: str) -> None:
    """One folded "Thinking…" above the answer, holding exactly the reasoning; the answer exactly, apart."""
    message = message_of(page, session_id)
    assert await message.count() == 1
    layout = await message.evaluate("(m) => [...m.children].filter((c) => !c.hidden).map((c) => c.className)")
    assert layout == ["reasoning", "body"], layout
    details = message.locator("details.reasoning")
    assert await details.count() == 1
    assert await details.get_attribute("open") is None
    assert await details.locator("summary").text_content() == "Thinking\u2026"
    assert await details.locator("div.reasoning-text").text_content() == "".join(REASONING)
    assert await shown_text(page, session_id) == normalized("".join(ANSWER))
    assert "café" not in await message.locator(".body").text_content()


async def test_reasoning_folds_above_the_answer_and_survives_a_reload(start_e2e: StartE2E, page: Any) -> None:
    service = await start_e2e(Reply(reasoning_then_answer(REASONING, ANSWER), pause=0.3))
    await page.goto(service.url("/"))
    session_id = await ask(page, "When are you open?")

    # Reload once the answer has begun and is not finished: the upstream is still pausing between deltas.
    await page.locator(f'[data-session-id="{session_id}"][data-status="streaming"] .body:not(:empty)').wait_for()
    stored = await stored_message(page, session_id)
    assert stored["reasoning"] == "".join(REASONING)
    assert 0 < len(stored["text"]) < len("".join(ANSWER)), stored
    await page.reload()
    await wait_status(page, session_id, "done")
    await assert_reasoning_and_answer(page, session_id)
    await screenshot(page, "e2e-reasoning")

    final = await service.session(session_id)
    assert (final["status"], final["reasoning"], final["text"]) == ("done", "".join(REASONING), "".join(ANSWER))
    stored = await stored_message(page, session_id)
    assert (stored["reasoning"], stored["text"]) == (final["reasoning"], final["text"])

    # A second reload after the end shows the same, once.
    await page.reload()
    await wait_status(page, session_id, "done")
    await assert_reasoning_and_answer(page, session_id)


async def test_content_filter_keeps_the_text_and_says_so(start_e2e: StartE2E, page: Any) -> None:
    deltas = ["I can tell you ", "that much, ", "but"]
    service = await start_e2e(Reply(openai_events(deltas, finish_reason="content_filter")))
    await page.goto(service.url("/"))
    session_id = await ask(page, "Tell me everything")
    await wait_status(page, session_id, "done")

    message = message_of(page, session_id)
    assert await shown_text(page, session_id) == normalized("".join(deltas))
    assert await message.locator(".note").inner_text() == FILTER_NOTE
    assert await message.locator("details.reasoning").count() == 0
    assert not await message.get_by_test_id("chat-retry").is_visible()
    assert (await service.session(session_id))["text"] == "".join(deltas)


async def test_in_band_error_shows_its_message_and_retry_answers(
    start_e2e: StartE2E, upstream: FakeUpstream, page: Any
) -> None:
    failed_reply = [
        chunk({"role": "assistant", "content": "Our hours "}),
        b'data: {"error":{"code":"server_error","message":"Provider disconnected unexpectedly"},'
        b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n',
    ]
    service = await start_e2e(Reply(failed_reply), Reply(openai_events(["Nine ", "to five."])))
    await page.goto(service.url("/"))
    failed = await ask(page, "Hours?")
    await wait_status(page, failed, "error")

    message = message_of(page, failed)
    assert await message.locator(".note").inner_text() == (
        "The AI provider reported an error during the answer. It said: “Provider disconnected unexpectedly”"
    )
    assert await shown_text(page, failed) == "Our hours"
    retry = message.get_by_test_id("chat-retry")
    assert await retry.is_visible()

    await retry.click()
    await page.locator('[data-testid="assistant-message"][data-status="done"]').wait_for()
    answers = page.get_by_test_id("assistant-message")
    assert await answers.count() == 1
    retried = await answers.get_attribute("data-session-id") or ""
    assert retried != failed
    assert await shown_text(page, retried) == "Nine to five."
    assert len(upstream.requests) == 2  # the retry asked the model again
    assert upstream.requests[1]["messages"][-1] == {"role": "user", "content": "Hours?"}


async def test_unreadable_answer_is_not_retryable(start_e2e: StartE2E, page: Any) -> None:
    # A content of a shape no API sends: the service ends the answer as upstream_bad_response.
    pieces = [chunk({"role": "assistant", "content": "Before "}), chunk({"content": 42}), b"data: [DONE]\n\n"]
    service = await start_e2e(Reply(pieces))
    await page.goto(service.url("/"))
    session_id = await ask(page, "Anything?")
    await wait_status(page, session_id, "error")

    message = message_of(page, session_id)
    note = await message.locator(".note").inner_text()
    assert note.startswith("The AI provider sent a response the service cannot read"), note
    assert await shown_text(page, session_id) == "Before"
    assert not await message.get_by_test_id("chat-retry").is_visible()
    assert (await service.session(session_id))["status"] == "failed"


# -- sources: answers grounded in the site's index (issue 14) ------------------------------------------------

DATA = Path(__file__).resolve().parents[1] / "data"


async def index_folders(out: Path, base_url: str, *folders: Path) -> str:
    """`chatbot index` over folders, run as an operator runs it; returns its report."""
    command = [sys.executable, "-m", "chatbot", "index", *map(str, folders), "--out", str(out), "--base-url", base_url]
    process = await asyncio.create_subprocess_exec(*command, stdout=PIPE, stderr=PIPE)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert f"wrote {out}" in stdout.decode()
    return stdout.decode()


async def test_sources_link_the_page_that_answers_and_none_for_a_question_matching_nothing(
    start_e2e: StartE2E, page: Any, tmp_path: Path
) -> None:
    labelled = json.loads((DATA / "site-questions.json").read_text())
    question, path = next((q, p) for q, p in labelled["questions"] if q == "Does Tidepool need an internet connection?")
    # Beside the site, a page whose front matter gives a script URL: it must never become a link.
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "trap.md").write_text("---\ntitle: Trap\nurl: javascript:alert(1)\n---\nQuokkafish swim in the trap.\n")
    index = tmp_path / "knowledge.sqlite3"
    report = await index_folders(index, labelled["base_url"], DATA / "site", trap)
    assert "its URL 'javascript:alert(1)' is not an http(s) URL" in report
    service = await start_e2e(
        Reply(openai_events(["No: the station constants ", "ship inside the binary."])),
        env={"CHATBOT_KNOWLEDGE": str(index)},
    )
    await page.goto(service.url("/"))

    # First in the conversation: a follow-up is searched with the earlier questions' words too.
    nothing = await ask(page, "Zxqv plorth gnarf?")
    await wait_status(page, nothing, "done")
    assert await message_of(page, nothing).locator("nav.sources").count() == 0
    assert (await service.session(nothing))["sources"] == []

    script = await ask(page, "Tell me about the quokkafish")
    await wait_status(page, script, "done")
    assert await message_of(page, script).locator("nav.sources").count() == 0
    assert (await service.session(script))["sources"] == []

    grounded = await ask(page, question)
    await wait_status(page, grounded, "done")
    message = message_of(page, grounded)
    layout = await message.evaluate("(m) => [...m.children].filter((c) => !c.hidden).map((c) => c.localName)")
    assert layout == ["div", "nav"], layout  # the answer, then its sources
    links = message.locator('nav.sources[aria-label="Sources"] > ul > li > a')
    shown = [(await a.get_attribute("href"), await a.text_content()) for a in await links.all()]
    assert shown[0] == (labelled["base_url"] + path, "Tidepool"), shown
    assert all(href and href.startswith(("https://", "http://")) for href, _ in shown), shown
    assert len({href for href, _ in shown}) == len(shown), shown
    for a in await links.all():
        assert (await a.get_attribute("target"), await a.get_attribute("rel")) == ("_blank", "noopener noreferrer")
    sources = (await service.session(grounded))["sources"]
    assert [(s["url"], s["title"]) for s in sources] == shown
    assert await shown_text(page, grounded) == "No: the station constants ship inside the binary."
    await screenshot(page, "e2e-sources")

    # After a reload each answer shows its own sources once.
    await page.reload()
    await wait_status(page, nothing, "done")
    assert await message_of(page, grounded).locator("nav.sources li").count() == len(shown)
    assert await message_of(page, nothing).locator("nav.sources").count() == 0
    assert await message_of(page, script).locator("nav.sources").count() == 0
    assert await page.locator('a[href^="javascript"]').count() == 0
