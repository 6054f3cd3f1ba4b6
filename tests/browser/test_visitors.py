"""Faults visitors reported against streaming chat widgets (issue 11), each replayed in Chromium.

Each test keeps the issue's reproduction and tries two or three other inputs of the same kind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatbot.providers import Finish, Message

from .conftest import (
    ScriptedProvider,
    StartService,
    ask,
    normalized,
    screenshot,
    shown_text,
    wait_status,
    widget_state,
)

ROOT_JS = 'document.querySelector(".chatbot-widget-host").shadowRoot'


class GatedProvider:
    """A model whose answer comes in the given pieces; before piece `i` it waits for `gates[i]`."""

    name = "gated"

    def __init__(self, pieces: Sequence[str], *, gates: Sequence[int] = (), delay: float = 0.02) -> None:
        self.pieces = list(pieces)
        self.gates = {i: asyncio.Event() for i in gates}
        self.delay = delay

    def release(self, index: int) -> None:
        self.gates[index].set()

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        for i, piece in enumerate(self.pieces):
            if i in self.gates:
                await self.gates[i].wait()
            await asyncio.sleep(self.delay)
            yield piece
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


@dataclass
class HostPage:
    """A page on another origin that embeds the widget: its own HTML head, body and response headers."""

    server: TestServer
    head: str = ""
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    widget_src: str = ""

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.server.port}"

    def url(self) -> str:
        return f"{self.origin}/"

    def html(self) -> str:
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Host</title>'
            f"{self.head}</head><body><h1>Host page</h1>{self.body}"
            f'<script src="{self.widget_src}" defer data-open="true"></script></body></html>'
        )


StartHost = Callable[..., Awaitable[tuple[Any, HostPage]]]


@pytest.fixture
async def start_host(start_service: StartService) -> AsyncIterator[StartHost]:
    """Start the service and a host page on another origin that embeds it."""
    servers: list[TestServer] = []

    async def start(*, head: str = "", body: str = "", headers: dict[str, str] | None = None, **settings: Any) -> Any:
        app = web.Application()
        host = HostPage(TestServer(app, host="127.0.0.1", port=0), head=head, body=body, headers=headers or {})

        async def index(request: web.Request) -> web.Response:
            return web.Response(text=host.html(), content_type="text/html", headers=host.headers)

        app.router.add_get("/", index)
        await host.server.start_server()
        servers.append(host.server)
        service = await start_service(cors_origins=(host.origin,), **settings)
        host.widget_src = service.url("/widget.js")
        return service, host

    yield start
    for server in servers:
        await server.close()


async def shadow(page: Any, script: str, arg: Any = None) -> Any:
    """Evaluate `script` as a function of (shadow root, arg)."""
    return await page.evaluate(f"([arg]) => ({script})({ROOT_JS}, arg)", [arg])


async def until(check: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    """Poll `check` until it is true (or time out)."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.03)


async def wait_for_text(page: Any, session_id: str, needle: str, within: float = 10) -> None:
    async def shown() -> bool:
        return needle in await shown_text(page, session_id)

    await until(shown, within)


async def assistant_count(page: Any) -> int:
    count: int = await page.get_by_test_id("assistant-message").count()
    return count


# ---- 1. IME: the Enter that confirms a word never sends ------------------------------------

SAFARI_IME_JS = """([text]) => {
  const input = document.querySelector(".chatbot-widget-host").shadowRoot.querySelector("textarea");
  input.focus();
  input.dispatchEvent(new CompositionEvent("compositionstart", {data: "", bubbles: true}));
  input.dispatchEvent(new CompositionEvent("compositionupdate", {data: text, bubbles: true}));
  input.value += text;
  input.dispatchEvent(new InputEvent("input", {data: text, inputType: "insertCompositionText", bubbles: true}));
  input.dispatchEvent(new CompositionEvent("compositionend", {data: text, bubbles: true}));
  // Safari: the Enter that confirmed the word arrives after compositionend, isComposing false, keyCode 229.
  const enter = new KeyboardEvent("keydown", {key: "Enter", code: "Enter", keyCode: 229, which: 229,
                                             bubbles: true, cancelable: true, composed: true});
  input.dispatchEvent(enter);
  return {value: input.value, prevented: enter.defaultPrevented};
}"""


@pytest.mark.parametrize("word", ["中文输入", "にほんご", "한국어"])
async def test_safari_ime_enter_after_compositionend_does_not_send(
    start_service: StartService, page: Any, word: str
) -> None:
    service = await start_service(demo_answer_tokens=5)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    await page.goto(service.url("/"))
    await page.get_by_test_id("chat-input").fill("我想问")
    result = await page.evaluate(SAFARI_IME_JS, [word])
    assert result == {"value": "我想问" + word, "prevented": False}
    await asyncio.sleep(0.3)
    assert posts == [] and await assistant_count(page) == 0
    assert await page.get_by_test_id("chat-input").input_value() == "我想问" + word

    await page.get_by_test_id("chat-input").press("Enter")  # a real Enter, after the word: sends
    await page.get_by_test_id("assistant-message").wait_for()
    assert len(posts) == 1
    assert await page.locator(".msg.user").inner_text() == "我想问" + word


async def test_chromium_ime_enter_and_escape_during_composition(start_service: StartService, page: Any) -> None:
    service = await start_service(demo_answer_tokens=5)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    await page.goto(service.url("/"))
    box = page.get_by_test_id("chat-input")
    await box.wait_for()
    cdp = await page.context.new_cdp_session(page)
    composed: list[str] = []
    # Keys are recorded on the widget's shadow root (capture), so a textarea the widget renders anew after
    # this line is still heard; the box is focused only then, right before the keys.
    await page.evaluate(
        """() => {
          window.__keys = [];
          const root = document.querySelector(".chatbot-widget-host").shadowRoot;
          root.addEventListener("keydown", (e) => window.__keys.push([e.key, e.isComposing, e.keyCode]), true);
        }"""
    )
    await box.focus()
    for word in ("にほん", "日本"):
        end = len(word)
        await cdp.send("Input.imeSetComposition", {"text": word, "selectionStart": end, "selectionEnd": end})
        composed.append(word)
    # Enter and Escape while the IME is composing belong to the IME.
    for key, code in (("Enter", 13), ("Escape", 27)):
        await cdp.send(
            "Input.dispatchKeyEvent",
            {"type": "rawKeyDown", "key": key, "code": key, "windowsVirtualKeyCode": 229, "nativeVirtualKeyCode": code},
        )
        up = {"type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": code}
        await cdp.send("Input.dispatchKeyEvent", up)
    await cdp.send("Input.insertText", {"text": "日本語"})
    await asyncio.sleep(0.3)
    keys = await page.evaluate("window.__keys")
    assert any(k[0] == "Enter" for k in keys), keys
    assert posts == [], keys
    assert await page.get_by_role("dialog", name="Assistant").is_visible()  # Escape did not close it
    assert await box.input_value() == "日本語"

    await box.press("Enter")
    await page.get_by_test_id("assistant-message").wait_for()
    assert await page.locator(".msg.user").inner_text() == "日本語"
    assert len(posts) == 1


# ---- 2. Storage: read back when writes fail; quota keeps the newest state that fits -----------

FILL_STORAGE_JS = """() => {
  if (localStorage.getItem("filled")) return;
  localStorage.setItem("room", "r".repeat(4000));
  let chunk = "x".repeat(1 << 20);
  let i = 0;
  while (chunk.length >= 8) {
    try { localStorage.setItem("fill" + i, chunk); i++; }
    catch { chunk = chunk.slice(0, chunk.length >> 1); }
  }
  localStorage.setItem("filled", "1");
  localStorage.removeItem("room");
}"""


async def test_full_storage_keeps_the_conversation_and_resumes_after_reload(
    start_service: StartService, page: Any
) -> None:
    service = await start_service(demo_answer_tokens=150, demo_tokens_per_second=40.0)
    await page.add_init_script(f"({FILL_STORAGE_JS})()")
    await page.goto(service.url("/"))
    question = "Please explain this long question. " * 100  # 3,500 characters of ~4,000 free
    session_id = await ask(page, question)
    await wait_for_text(page, session_id, " ", within=10)

    async def long_enough() -> bool:  # the answer no longer fits beside the question
        return len(await shown_text(page, session_id)) >= 700

    await until(long_enough)
    stored = await widget_state(page)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["text"] == question

    await page.reload()
    # The stored conversation is shown at once, although writing to storage fails.
    await page.locator(".msg.user").wait_for(timeout=5000)
    assert normalized(await page.locator(".msg.user").inner_text()) == normalized(question)
    await wait_status(page, session_id, "done", within_ms=20_000)
    final = await service.session(session_id)
    assert await shown_text(page, session_id) == normalized(final["text"])
    assert await assistant_count(page) == 1
    assert len(final["text"]) > 700


SEEDED = {
    "conversationId": None,
    "open": True,
    "messages": [
        {"id": "u1", "role": "user", "text": "Seeded question"},
        {"id": "a1", "role": "assistant", "text": "Seeded **answer**", "sessionId": "s1", "status": "done"},
    ],
}


@pytest.mark.parametrize(
    "breakage",
    [
        "Storage.prototype.setItem = function () { throw new DOMException('full', 'QuotaExceededError'); };",
        "Storage.prototype.setItem = function () { throw new DOMException('no', 'SecurityError'); };",
        "Storage.prototype.removeItem = Storage.prototype.setItem = function () { throw new Error('read-only'); };",
    ],
)
async def test_stored_conversation_is_read_when_writes_fail(
    start_service: StartService, page: Any, breakage: str
) -> None:
    service = await start_service(demo_answer_tokens=8)
    key = f"chatbot-widget:v1:{service.url('/')}"
    seed = json.dumps(json.dumps(SEEDED))
    await page.add_init_script(f"localStorage.setItem({json.dumps(key)}, {seed}); {breakage}")
    await page.goto(service.url("/"))
    await page.get_by_text("Seeded question").wait_for()
    assert await page.locator('[data-testid="assistant-message"] strong').inner_text() == "answer"
    session_id = await ask(page, "And now?")
    await wait_status(page, session_id, "done")  # the widget keeps working in memory


# ---- 3. Two tabs: New conversation in one holds in all ---------------------------------------


@pytest.mark.parametrize(
    "asker, clicker",
    [(0, 1), (1, 0), (1, 1)],
    ids=["leader-asks-other-clears", "follower-asks-leader-clears", "follower-asks-and-clears"],
)
async def test_new_conversation_in_another_tab_holds_while_this_one_streams(
    start_service: StartService, page: Any, asker: int, clicker: int
) -> None:
    service = await start_service(demo_tokens_per_second=15.0)
    other = await page.context.new_page()
    await page.goto(service.url("/"))
    await page.get_by_test_id("chat-input").wait_for()  # the first tab is the leader: it holds the stream
    await other.goto(service.url("/"))
    tabs = (page, other)
    session_id = await ask(tabs[asker], "A long answer please")
    await wait_for_text(tabs[asker], session_id, " ")
    await wait_status(tabs[1 - asker], session_id, "streaming")

    await tabs[clicker].get_by_test_id("chat-new").click()
    await asyncio.sleep(1.5)  # the streaming tab would have written its old state by now
    for tab in tabs:
        assert await assistant_count(tab) == 0
        assert await tab.locator(".msg.user").count() == 0
        assert (await widget_state(tab))["messages"] == []

    async def cancelled() -> bool:
        status: str = (await service.session(session_id))["status"]
        return status == "cancelled"

    await until(cancelled, 5)
    await other.reload()
    await page.reload()
    await asyncio.sleep(0.5)
    assert await assistant_count(other) == 0 and await assistant_count(page) == 0

    # And the conversation goes on from either tab.
    fresh = await ask(other, "Starting over")
    await wait_status(page, fresh, "done")
    assert await assistant_count(page) == 1


# ---- 4. Finished blocks are never touched: selection and clicks work while streaming ----------


async def test_selection_and_links_survive_the_stream(start_service: StartService, page: Any) -> None:
    provider = GatedProvider([], gates=[3])
    service = await start_service(provider=provider)
    link = service.url("/healthz")
    provider.pieces = [
        f"First paragraph with [a link]({link}) in it.\n\n",
        "| A | B |\n|---|---|\n| 1 | 2 |\n\n",
        "Second paragraph is still",
        " being written, word",
        " after word",
        " after word.",
    ]
    await page.goto(service.url("/"))
    session_id = await ask(page, "Stream something")
    await wait_for_text(page, session_id, "still")
    marked = await shadow(
        page,
        """(root) => {
          const body = root.querySelector('[data-testid="assistant-message"] .body');
          window.__removed = 0;
          new MutationObserver((records) => {
            for (const r of records) window.__removed += r.removedNodes.length;
          }).observe(body.firstElementChild, {subtree: true, childList: true, characterData: true});
          window.__first = body.firstElementChild;
          window.__table = body.querySelector("table");
          const text = body.firstElementChild.firstChild;
          getSelection().setBaseAndExtent(text, 0, text, 5);
          return getSelection().toString();
        }""",
    )
    assert marked == "First"
    async with page.context.expect_page() as popup_info:
        await page.get_by_role("link", name="a link").click()  # clickable while the answer streams
    popup = await popup_info.value
    await popup.wait_for_load_state()
    assert popup.url == link
    await popup.close()

    provider.release(3)
    await wait_status(page, session_id, "done")
    same = await shadow(
        page,
        """(root) => {
          const body = root.querySelector('[data-testid="assistant-message"] .body');
          return [body.firstElementChild === window.__first, body.querySelector("table") === window.__table,
                  window.__removed, getSelection().toString()];
        }""",
    )
    assert same == [True, True, 0, "First"]
    assert (await shown_text(page, session_id)).endswith("after word after word.")


# ---- 5. Raw HTML in model text is shown as text; markdown still renders ------------------------

HTML_TEXT = {
    "rust": ("It returns Vec<String>, or `Vec<String>` in code, and **bold** stays bold.", "returns Vec<String>, or"),
    "rss": ("An RSS feed starts with <channel> and ends with </channel>.", "starts with <channel> and ends with </"),
    "block": ("<div>\nA block of <b>html</b>\n</div>\n\nThen *text*.", "A block of <b>html</b>"),
    "compare": ("If a<b and c>d then <br> is a tag & &amp; is an entity.", "a<b and c>d then <br> is a tag & & is"),
}


@pytest.mark.parametrize("case", list(HTML_TEXT))
async def test_model_html_is_shown_as_text(start_service: StartService, page: Any, case: str) -> None:
    answer, visible = HTML_TEXT[case]
    service = await start_service(provider=ScriptedProvider({"Q": answer}))
    await page.goto(service.url("/"))
    session_id = await ask(page, "Q")
    await wait_status(page, session_id, "done")
    message = page.locator(f'[data-session-id="{session_id}"] .body')
    assert visible in await message.inner_text()
    for tag in ("div", "b", "channel", "br"):
        assert await message.locator(tag).count() == 0, tag
    if case == "rust":
        assert await message.locator("strong").inner_text() == "bold"
        assert await message.locator("code").inner_text() == "Vec<String>"
    if case == "block":
        assert await message.locator("em").inner_text() == "text"


# ---- 6. Right-to-left text ------------------------------------------------------------------

RTL_ANSWER = "مرحبا بك، هذا نص عربي.\n\nAn English paragraph.\n\nשלום, זה טקסט בעברית."


async def test_right_to_left_text_in_answer_and_input(start_service: StartService, page: Any) -> None:
    service = await start_service(provider=ScriptedProvider({"سؤال بالعربية": RTL_ANSWER}))
    await page.goto(service.url("/"))
    box = page.get_by_test_id("chat-input")
    await box.fill("שאלה בעברית")
    assert await box.evaluate("(el) => el.matches(':dir(rtl)')")
    await box.fill("Hello")
    assert await box.evaluate("(el) => el.matches(':dir(ltr)')")
    session_id = await ask(page, "سؤال بالعربية")
    await wait_status(page, session_id, "done")
    directions = await page.locator(f'[data-session-id="{session_id}"] .body p').evaluate_all(
        "(ps) => ps.map((p) => getComputedStyle(p).direction)"
    )
    assert directions == ["rtl", "ltr", "rtl"]
    assert await page.locator(".msg.user").evaluate("(el) => getComputedStyle(el.firstChild).direction") == "rtl"
    await screenshot(page, "rtl")


# ---- 7. The host page's CSS cannot resize the widget ----------------------------------------

HOST_CSS = [
    "html { font-size: 62.5%; }",
    "html { font-size: 30px; } body { font-size: 2rem; line-height: 3; }",
    ".chatbot-widget-host { font-size: 8px; line-height: 4; } :root { font-size: 5px; }",
]


@pytest.mark.parametrize("css", HOST_CSS)
async def test_host_css_does_not_change_the_widget_sizes(start_host: StartHost, page: Any, css: str) -> None:
    _, host = await start_host(head=f"<style>{css}</style>", demo_answer_tokens=5)
    await page.goto(host.url())
    await page.get_by_role("heading", name="Assistant").wait_for()
    sizes = await shadow(
        page,
        """(root) => {
          const px = (sel) => getComputedStyle(root.querySelector(sel)).fontSize;
          return [px("h2"), px(".launcher"), px(".log"), px("textarea"), px("button.primary"),
                  root.querySelector(".panel").getBoundingClientRect().width];
        }""",
    )
    assert sizes == ["16px", "15px", "15px", "16px", "15px", 400]


# ---- 8. A host page with Trusted Types ------------------------------------------------------

HOST_POLICY = (
    "<script>trustedTypes.createPolicy('hostpolicy', {createHTML: (s) => s.replace(/</g, '&lt;')});"
    "document.addEventListener('securitypolicyviolation', (e) => (window.__violations = "
    "(window.__violations || 0) + 1));</script>"
)


@pytest.mark.parametrize(
    "csp",
    [
        "require-trusted-types-for 'script'; trusted-types hostpolicy",
        "require-trusted-types-for 'script'; trusted-types hostpolicy dompurify",
        "require-trusted-types-for 'script'; trusted-types 'none'",
    ],
)
async def test_widget_works_under_the_hosts_trusted_types(start_host: StartHost, page: Any, csp: str) -> None:
    answer = "Some **bold** text, a [link](https://example.com/), and a <b>tag</b>.\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    head = "" if "'none'" in csp else HOST_POLICY
    _, host = await start_host(
        head=head, headers={"Content-Security-Policy": csp}, provider=ScriptedProvider({"Q": answer})
    )
    await page.goto(host.url())
    session_id = await ask(page, "Q")
    await wait_status(page, session_id, "done")
    message = page.locator(f'[data-session-id="{session_id}"] .body')
    assert await message.locator("strong").inner_text() == "bold"
    assert await message.locator("td").count() == 2
    assert "a <b>tag</b>." in await message.inner_text()
    assert await message.locator("a").get_attribute("href") == "https://example.com/"


# ---- 9. Focus stays in the message box after sending -----------------------------------------


@pytest.mark.parametrize("how", ["tab-enter", "click", "enter-in-box"])
async def test_focus_stays_in_the_message_box_after_sending(start_service: StartService, page: Any, how: str) -> None:
    service = await start_service(demo_answer_tokens=10)
    await page.goto(service.url("/"))
    box = page.get_by_test_id("chat-input")
    await box.fill("Where does my focus go")
    if how == "tab-enter":
        await box.focus()
        await page.keyboard.press("Tab")
        assert await page.get_by_test_id("chat-send").evaluate("(el) => el.getRootNode().activeElement === el")
        await page.keyboard.press("Enter")
    elif how == "click":
        await page.get_by_test_id("chat-send").click()
    else:
        await box.press("Enter")
    message = page.get_by_test_id("assistant-message")
    await message.wait_for()
    assert await box.evaluate("(el) => el.getRootNode().activeElement === el")
    await wait_status(page, await message.get_attribute("data-session-id") or "", "done")
    assert await box.evaluate("(el) => el.getRootNode().activeElement === el")
    await page.keyboard.type("typed straight away")
    assert await box.input_value() == "typed straight away"


# ---- 10. After a reload the newest message is in view ----------------------------------------

LONG_CONVERSATION_JS = """([key, turns]) => {
  const messages = [];
  for (let i = 0; i < turns; i++) {
    messages.push({id: "u" + i, role: "user", text: "Question number " + i});
    messages.push({id: "a" + i, role: "assistant", sessionId: "s" + i, status: "done",
                   text: "Answer number " + i + ".\\n\\n" + "Some words to make it long. ".repeat(12)});
  }
  localStorage.setItem(key, JSON.stringify({conversationId: null, open: true, messages}));
}"""


@pytest.mark.parametrize("viewport", [{"width": 1100, "height": 760}, {"width": 390, "height": 700}])
async def test_after_a_reload_the_newest_message_is_in_view(
    start_service: StartService, browser: Any, viewport: dict[str, int]
) -> None:
    service = await start_service()
    context = await browser.new_context(viewport=viewport)
    try:
        page = await context.new_page()
        await page.goto(service.url("/"))
        await page.evaluate(LONG_CONVERSATION_JS, [f"chatbot-widget:v1:{service.url('/')}", 12])
        await page.reload()
        last = page.get_by_test_id("assistant-message").last
        await last.wait_for()
        await asyncio.sleep(0.5)
        log = page.get_by_role("log")
        height, top, visible = await log.evaluate("(log) => [log.scrollHeight, log.scrollTop, log.clientHeight]")
        assert height > 2000, (height, top, visible)
        assert top + visible >= height - 2, (height, top, visible)
        assert await last.is_visible()
        await screenshot(page, f"reload-at-newest-{viewport['width']}")

        # Closed and opened again: still the newest.
        await log.evaluate("(log) => (log.scrollTop = 0)")
        await page.get_by_role("button", name="Close chat").click()
        await page.get_by_role("button", name="Chat", exact=True).click()
        height, top, visible = await log.evaluate("(log) => [log.scrollHeight, log.scrollTop, log.clientHeight]")
        assert top + visible >= height - 2, (height, top, visible)
    finally:
        await context.close()


# ---- 11. A table streams as a table, never as raw pipes ----------------------------------------

HELD_BACK = [
    (["Scores:\n\n", "| Name | Score |\n", "|---|---|\n| Ann | 3 |\n| Bo | 5 |"], "|", "Scores:"),
    (["See ", "[the docs](http://127.0.0.1:9/do", "cs) for more."], "](", "See the docs"),
    (["This is ", "**very impor", "tant** indeed."], "**", "This is very impor"),
    (["Rows:\n", "| a | b |\n|--", "-|---|\n| 1 | 2 |"], "|", "Rows:"),
]


@pytest.mark.parametrize("pieces, hidden, shown", HELD_BACK, ids=["table", "half-link", "bold", "partial-delimiter"])
async def test_incomplete_constructs_are_held_back_while_the_model_pauses(
    start_service: StartService, page: Any, pieces: list[str], hidden: str, shown: str
) -> None:
    provider = GatedProvider(pieces, gates=[2])
    service = await start_service(provider=provider)
    await page.goto(service.url("/"))
    session_id = await ask(page, "Q")
    await wait_for_text(page, session_id, shown.split()[0])
    await asyncio.sleep(0.4)  # the model pauses here
    text = await page.locator(f'[data-session-id="{session_id}"] .body').inner_text()
    assert hidden not in text, text
    assert normalized(text).startswith(shown), text
    provider.release(2)
    await wait_status(page, session_id, "done")
    final = await page.locator(f'[data-session-id="{session_id}"] .body').inner_text()
    assert hidden not in final, final
    if hidden == "|":
        assert await page.locator(f'[data-session-id="{session_id}"] table th').count() == 2


# ---- 12. Wide tables and long code scroll in their own box ------------------------------------

WIDE_TABLE = (
    "| " + " | ".join(f"Column{i} heading" for i in range(10)) + " |\n"
    "|" + "---|" * 10 + "\n"
    "| " + " | ".join(f"value{i} words" for i in range(10)) + " |\n\n"
    "```\n" + "x = " + "long_identifier + " * 20 + "1\n```\n\nAfter."
)


async def test_wide_tables_and_code_scroll_inside_their_box(start_service: StartService, page: Any) -> None:
    service = await start_service(provider=ScriptedProvider({"Q": WIDE_TABLE}, piece_chars=40))
    await page.goto(service.url("/"))
    session_id = await ask(page, "Q")
    await wait_status(page, session_id, "done")
    box = await shadow(
        page,
        """(root) => {
          const msg = root.querySelector('[data-testid="assistant-message"]');
          const scroll = msg.querySelector(".table-scroll");
          const pre = msg.querySelector("pre");
          const cells = [...msg.querySelectorAll("th, td")];
          const log = root.querySelector(".log");
          return {
            tableScrolls: scroll.scrollWidth > scroll.clientWidth + 50,
            preScrolls: pre.scrollWidth > pre.clientWidth + 50,
            narrowest: Math.min(...cells.map((c) => c.getBoundingClientRect().width)),
            wordsWhole: cells.every((c) => c.scrollWidth <= c.clientWidth + 1),
            msgFits: msg.getBoundingClientRect().right <= log.getBoundingClientRect().right,
            logScrollsSideways: log.scrollWidth > log.clientWidth,
          };
        }""",
    )
    assert box["tableScrolls"] and box["preScrolls"], box
    assert box["narrowest"] >= 60 and box["wordsWhole"], box
    assert box["msgFits"] and not box["logScrollsSideways"], box
    await screenshot(page, "wide-table")


# ---- Any rendering failure shows plain text; the stream goes on ------------------------------

BROKEN_MODULES = {
    "lexer-throws": ("marked.esm.js", 'export class Marked { lexer() { throw new Error("lexer broke"); } }'),
    "sanitizer-throws": ("purify.es.mjs", 'export default { sanitize() { throw new Error("purify broke"); } };'),
    "module-missing": ("marked.esm.js", None),
}


@pytest.mark.parametrize("case", list(BROKEN_MODULES))
async def test_a_rendering_failure_shows_plain_text_and_the_stream_goes_on(
    start_service: StartService, page: Any, case: str
) -> None:
    answer = "Plain **markdown** here.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nAnd the end."
    service = await start_service(provider=ScriptedProvider({"Q": answer}))
    name, body = BROKEN_MODULES[case]

    async def broken(route: Any) -> None:
        if body is None:
            await route.fulfill(status=404, body="missing")
        else:
            await route.fulfill(status=200, body=body, headers={"Content-Type": "text/javascript"})

    await page.route(f"**/vendor/{name}", broken)
    await page.goto(service.url("/"))
    session_id = await ask(page, "Q")
    await wait_status(page, session_id, "done")
    message = page.locator(f'[data-session-id="{session_id}"] .body')
    assert await message.locator("strong").count() == 0
    assert "Plain **markdown** here." in await message.inner_text()
    assert await shown_text(page, session_id) == normalized(answer)


# ---- Streaming in any chunking shows the same text as rendering it whole -------------------------

SAMPLES = [
    (
        "# Title\n\nIntro with **bold**, *em*, `code` and a [link](https://example.com/a_(b)).\n\n"
        "- one\n- two\n\n  still two\n- three\n\n1. first\n2. second\n\n"
        "> quoted\n> more\n\n```py\ndef f():\n\n    return '<b>'\n```\n\n"
        "| h1 | h2 |\n|:--|--:|\n| a | b |\n\nText <span>raw</span> & &amp; &#x41;.\n\n---\n\nمرحبا 👋🏽 end"
    ),
    "No blank lines at all but *emphasis* and\na line break and `ticks`",
    "| only | table |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |",
]

STREAM_RENDER_JS = """async ([text, sizes]) => {
  const render = await import("/widget/render.js");
  await render.loadMarkdown(location.origin + "/");
  const whole = document.createElement("div");
  new render.StreamingText(whole).update(text, {final: true});
  const results = [];
  for (const size of sizes) {
    const box = document.createElement("div");
    const streaming = new render.StreamingText(box);
    let removedCommitted = 0;
    const committed = new Set();
    for (let end = size; end < text.length + size; end += size) {
      for (const node of box.childNodes) if (!streaming.live.includes(node)) committed.add(node);
      streaming.update(text.slice(0, end));
      for (const node of committed) if (node.parentNode !== box) removedCommitted++;
    }
    streaming.update(text, {final: true});
    results.push({size, text: box.textContent.replace(/\\s+/g, " ").trim(), removedCommitted});
  }
  return {whole: whole.textContent.replace(/\\s+/g, " ").trim(), results};
}"""


@pytest.mark.parametrize("sample", range(len(SAMPLES)))
async def test_any_chunking_renders_the_same_text(start_service: StartService, page: Any, sample: int) -> None:
    service = await start_service()
    await page.goto(service.url("/"))
    outcome = await page.evaluate(STREAM_RENDER_JS, [SAMPLES[sample], [1, 2, 7, 31]])
    for result in outcome["results"]:
        assert result["text"] == outcome["whole"], result
        assert result["removedCommitted"] == 0, result
    if sample == 0:
        assert "Text <span>raw</span> & & A." in outcome["whole"]
        assert "def f(): return '<b>'" in outcome["whole"]
