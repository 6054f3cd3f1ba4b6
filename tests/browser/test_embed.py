"""The widget embedded on another origin: CORS, untrusted model output, keyboard and phone use."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from .conftest import (
    RECORD_STATUSES_JS,
    ROOT,
    ScriptedProvider,
    Service,
    Site,
    StartService,
    ask,
    normalized,
    screenshot,
    shown_text,
    stored_message,
    wait_status,
)
from .cutting_proxy import CuttingProxy

StartSite = Callable[[], Awaitable[Site]]

LEAK = "http://127.0.0.1:9/leak"
ATTACK_QUESTION = "Show me something dangerous"
ATTACK = (
    "Here is **bold** text and `code`.\n\n"
    "<img src=x onerror=\"window.__pwned='img'\">\n\n"
    "<script>window.__pwned='script'</script>\n\n"
    f"![tracking pixel]({LEAK}?md=1)\n\n"
    "[click me](javascript:window.__pwned='md-link')\n\n"
    "<a href=\"javascript:window.__pwned='a'\">also me</a>\n\n"
    "<svg><script>window.__pwned='svg'</script><image href=\"" + LEAK + '?svg=1"/></svg>\n\n'
    "<iframe src=\"javascript:parent.__pwned='iframe'\"></iframe>\n\n"
    f'<div style="background:url({LEAK}?css=1)">styled</div>\n\n'
    f"<form action={LEAK}><button>submit</button></form>\n\n"
    "<details open ontoggle=\"window.__pwned='toggle'\"><summary>more</summary>hidden</details>\n"
)
MARKDOWN_QUESTION = "How do I embed the widget?"
MARKDOWN = (
    "Add **one tag** to your page:\n\n"
    '```html\n<script src="https://chat.example/widget.js" defer></script>\n```\n\n'
    "Then:\n\n"
    "1. list your site in `CHATBOT_CORS_ORIGINS`;\n"
    "2. reload, and ask away.\n\n"
    "| event | means |\n|---|---|\n| `token` | more text |\n| `done` | the answer is whole |\n\n"
    "Answers *survive* a reload, a dropped connection and a [sleeping phone](https://example.com/)."
)


async def embedded(
    start_service: StartService, start_site: StartSite, *, open_panel: bool = True, **settings: Any
) -> tuple[Service, Site]:
    site = await start_site()
    service = await start_service(cors_origins=(site.origin,), **settings)
    site.widget_src = service.url("/widget.js")
    site.open_panel = open_panel
    return service, site


async def test_widget_works_embedded_cross_origin(
    start_service: StartService, start_site: StartSite, page: Any
) -> None:
    service, site = await embedded(start_service, start_site)
    assert not site.url().startswith(service.url("/"))
    await page.goto(site.url())
    session_id = await ask(page, "Does this work from another site")
    await wait_status(page, session_id, "done")

    final = await service.session(session_id)
    assert (await stored_message(page, session_id))["text"] == final["text"]
    assert await shown_text(page, session_id) == normalized(final["text"])
    # The conversation continues with the id the service gave: a follow-up is one conversation.
    second = await ask(page, "And a follow-up question")
    await wait_status(page, second, "done")
    assert (await service.session(second))["conversation_id"] == final["conversation_id"]
    await screenshot(page, "embedded")


async def test_cross_origin_stream_resumes_through_cuts(
    start_service: StartService, start_site: StartSite, page: Any
) -> None:
    service, site = await embedded(start_service, start_site)
    proxy = CuttingProxy(service.server.port or 0, cut_after=0.3)
    await proxy.start()
    try:
        # The browser's own resumes carry Last-Event-ID to another origin; each must get CORS headers.
        site.widget_src = f"http://127.0.0.1:{proxy.port}/widget.js"
        await page.goto(site.url())
        await page.evaluate(RECORD_STATUSES_JS)
        session_id = await ask(page, "Does resuming work across origins")
        await wait_status(page, session_id, "done", within_ms=30_000)

        final = await service.session(session_id)
        assert len(proxy.resumed_requests) >= 3, proxy.events_requests
        statuses = [s["status"] for s in await page.evaluate("window.__statuses") if s["id"] == session_id]
        assert "reconnecting" in statuses
        assert "error" not in statuses
        assert (await stored_message(page, session_id))["text"] == final["text"]
        assert await shown_text(page, session_id) == normalized(final["text"])
    finally:
        await proxy.close()


async def test_unlisted_origin_is_refused(start_service: StartService, start_site: StartSite, page: Any) -> None:
    service, site = await embedded(start_service, start_site)
    other = await start_site()
    other.widget_src = site.widget_src  # same widget, on an origin missing from CHATBOT_CORS_ORIGINS
    await page.goto(other.url())
    await page.get_by_test_id("chat-input").fill("Can I use your service")
    await page.get_by_test_id("chat-send").click()
    refused = page.locator('[data-testid="assistant-message"][data-status="error"]')
    await refused.wait_for()
    assert "could not be reached" in await refused.inner_text()
    async with service.http.options(
        service.url("/sessions"), headers={"Origin": other.origin, "Access-Control-Request-Method": "POST"}
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_model_html_renders_inert(start_service: StartService, start_site: StartSite, page: Any) -> None:
    provider = ScriptedProvider({ATTACK_QUESTION: ATTACK, MARKDOWN_QUESTION: MARKDOWN})
    service, site = await embedded(start_service, start_site, provider=provider)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await page.goto(site.url())

    session_id = await ask(page, ATTACK_QUESTION)
    await wait_status(page, session_id, "done")
    assert (await stored_message(page, session_id))["text"] == ATTACK  # stored raw, rendered safe

    message = page.locator(f'[data-testid="assistant-message"][data-session-id="{session_id}"]')
    for links in await message.locator("a").all():
        await links.click(modifiers=["Control"])  # would run a javascript: URL if one survived
    html = await message.locator(".body").inner_html()
    assert await message.locator("strong").inner_text() == "bold"
    assert "[tracking pixel]" in await message.inner_text()
    for tag in ("img", "script", "svg", "iframe", "form", "button", "image", "[style]", "[onerror]", "[ontoggle]"):
        assert await message.locator(".body").locator(tag).count() == 0, f"{tag} survived: {html}"
    # Raw HTML in the model's text is shown as text (issue 11), so the words are there; no attribute is.
    attributes = await message.locator(".body *").evaluate_all(
        "(nodes) => nodes.flatMap((n) => [...n.attributes].map((a) => a.value))"
    )
    assert not [value for value in attributes if "javascript:" in value or "/leak" in value], attributes
    assert "also me" in await message.inner_text()
    assert await page.evaluate("window.__pwned") is None
    assert not dialogs
    assert not [url for url in requested if "/leak" in url], requested
    await screenshot(page, "inert")

    # Markdown on the service's own demo page, under its Content-Security-Policy.
    await page.goto(service.url("/"))
    answer = await ask(page, MARKDOWN_QUESTION)
    await wait_status(page, answer, "done")
    rendered = page.locator(f'[data-session-id="{answer}"]')
    assert await rendered.locator("pre code").count() == 1
    assert await rendered.locator("ol li").count() == 2
    assert await rendered.locator("table td").count() == 4
    link = rendered.locator("a")
    assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert await link.get_attribute("target") == "_blank"
    await screenshot(page, "markdown")
    if os.environ.get("CHATBOT_UPDATE_DOCS_SCREENSHOT") == "1":
        await page.screenshot(path=str(ROOT / "docs" / "widget.png"))


async def test_keyboard_only_on_a_phone(start_service: StartService, start_site: StartSite, browser: Any) -> None:
    service, site = await embedded(start_service, start_site, open_panel=False)
    context = await browser.new_context(viewport={"width": 390, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = await context.new_page()
        await page.goto(site.url())
        launcher = page.get_by_role("button", name="Chat", exact=True)
        panel = page.get_by_role("dialog", name="Assistant")
        await launcher.wait_for()
        assert await panel.is_hidden()

        await page.keyboard.press("Tab")
        assert await _focused(page) == "launcher"
        await page.keyboard.press("Enter")
        await panel.wait_for()
        assert await launcher.is_hidden()  # the open panel takes its place
        assert await _focused(page) == "input"

        await page.keyboard.type("Is this usable on a phone")
        await page.keyboard.press("Enter")
        answer = page.get_by_test_id("assistant-message")
        await answer.wait_for()
        session_id = await answer.get_attribute("data-session-id") or ""
        assert await page.get_by_role("log").get_attribute("aria-live") == "polite"
        await wait_status(page, session_id, "done")
        assert await answer.get_attribute("aria-busy") == "false"
        assert await shown_text(page, session_id) == normalized((await service.session(session_id))["text"])

        box = await panel.bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 740
        assert await page.get_by_test_id("chat-input").is_visible()
        assert await page.get_by_test_id("chat-send").is_visible()
        await screenshot(page, "phone")

        await page.keyboard.press("Escape")
        await panel.wait_for(state="hidden")
        assert await _focused(page) == "launcher"
        assert await launcher.get_attribute("aria-expanded") == "false"
    finally:
        await context.close()


async def _focused(page: Any) -> str:
    """Which widget control has keyboard focus: "launcher", "input", another tag, or ""."""
    result: str = await page.evaluate(
        """() => {
          const host = document.querySelector(".chatbot-widget-host");
          const el = host && host.shadowRoot.activeElement;
          if (!el) return "";
          if (el.classList.contains("launcher")) return "launcher";
          if (el.dataset.testid === "chat-input") return "input";
          return el.localName;
        }"""
    )
    return result
