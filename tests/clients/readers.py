"""The SSE clients people read this service with, each following one answer the way its users would.

Every reader returns a `Reading`: the events the client dispatched (in order), how many times it
connected, and how it ended. The Python libraries do not reconnect by themselves, so their readers do
what an EventSource does: reconnect after `retry:` with the last id seen, stop on a terminal event or on
any answer other than 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import sseclient

from tests.conftest import ROOT

TERMINAL = frozenset({"done", "error"})
NAMED = frozenset({"token", "done", "error", "reasoning", "sources"})
NODE_DIR = ROOT / "tests" / "clients" / "node"
NODE = shutil.which("node") or "/usr/bin/node"
README = ROOT / "README.md"
DEFAULT_RETRY_MS = 100  # until the stream says otherwise (the tests' services use 100 ms too)


@dataclass(frozen=True)
class Seen:
    type: str
    data: str
    id: str


@dataclass
class Reading:
    client: str
    events: list[Seen] = field(default_factory=list)
    connections: int = 0
    end: str = ""  # "terminal" | "status <n>" | "gave up"
    text: str = ""  # the answer as the client's own code put it together (the JS clients' snippet)
    callbacks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # the snippet's onDone/onError calls

    def token_text(self) -> str:
        return "".join(json.loads(e.data)["text"] for e in self.events if e.type == "token")


def readme_snippet() -> str:
    """The README's plain-EventSource snippet, exactly as written there."""
    text = README.read_text()
    start = text.index("```js\n// Follow one answer")
    return text[start + len("```js\n") : text.index("```", start + 6)]


# --- httpx-sse ---------------------------------------------------------------------------------------------


async def follow_httpx_sse(url: str, *, deadline_s: float = 60) -> Reading:
    reading = Reading("httpx-sse")
    last_id, retry_ms = "", DEFAULT_RETRY_MS
    timeout = httpx.Timeout(10.0, read=30.0)
    async with asyncio.timeout(deadline_s), httpx.AsyncClient(timeout=timeout) as http:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with httpx_sse.aconnect_sse(http, "GET", url, headers=headers) as source:
                    reading.connections += 1
                    if source.response.status_code != 200:
                        reading.end = f"status {source.response.status_code}"
                        return reading
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            retry_ms = sse.retry
                        reading.events.append(Seen(sse.event, sse.data, sse.id))
                        last_id = sse.id or last_id
                        if sse.event in TERMINAL:
                            reading.end = "terminal"
                            return reading
            except httpx.TransportError:
                pass  # a cut connection: reconnect, as an EventSource would
            await asyncio.sleep(retry_ms / 1000)


# --- sseclient-py (synchronous: runs in a thread) ----------------------------------------------------------


def _follow_sseclient(url: str, deadline_s: float) -> Reading:
    reading = Reading("sseclient-py")
    last_id, retry_ms = "", DEFAULT_RETRY_MS
    with httpx.Client(timeout=httpx.Timeout(10.0, read=30.0)) as http:
        loop_deadline = time.monotonic() + deadline_s
        while time.monotonic() < loop_deadline:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                with http.stream("GET", url, headers=headers) as response:
                    reading.connections += 1
                    if response.status_code != 200:
                        reading.end = f"status {response.status_code}"
                        return reading
                    for event in sseclient.SSEClient(response.iter_bytes()).events():
                        if event.retry:
                            retry_ms = int(event.retry)
                        reading.events.append(Seen(event.event, event.data, event.id or ""))
                        last_id = event.id or last_id
                        if event.event in TERMINAL:
                            reading.end = "terminal"
                            return reading
            except httpx.TransportError:
                pass
            time.sleep(retry_ms / 1000)
    reading.end = "gave up"
    return reading


async def follow_sseclient(url: str, *, deadline_s: float = 60) -> Reading:
    return await asyncio.to_thread(_follow_sseclient, url, deadline_s)


# --- npm eventsource (Node) ----------------------------------------------------------------------------------


def node_client_missing() -> str | None:
    """Why the npm client cannot run here, or None."""
    if not Path(NODE).exists():
        return f"no node at {NODE}"
    if not (NODE_DIR / "node_modules" / "eventsource" / "package.json").exists():
        return f"npm's eventsource is not installed: run `npm ci --prefix {NODE_DIR.relative_to(ROOT)}`"
    return None


async def follow_node_eventsource(url: str, *, deadline_s: float = 60) -> Reading:
    reading = Reading("npm eventsource")
    with tempfile.NamedTemporaryFile("w", suffix=".js", delete=False) as snippet:
        snippet.write(readme_snippet())
    try:
        proc = await asyncio.create_subprocess_exec(
            NODE, str(NODE_DIR / "follow.mjs"), url, snippet.name,
            cwd=str(NODE_DIR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(deadline_s):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        os.unlink(snippet.name)
    assert proc.returncode == 0, f"node exited {proc.returncode}: {err.decode()[-2000:]}"
    for line in out.decode().splitlines():
        record: dict[str, Any] = json.loads(line)
        if record["kind"] == "open":
            reading.connections += 1
        elif record["kind"] == "event":
            reading.events.append(Seen(record["type"], record["data"], record["id"]))
        elif record["kind"] == "end":
            reading.end = "closed" if record["payload"].get("code") == "stream_closed" else "terminal"
            reading.text = record["text"]
    return reading


# --- Chromium's EventSource ----------------------------------------------------------------------------------

PAGE_PATH = "/__client_matrix"
PAGE = "<!doctype html><html><head><meta charset='utf-8'><title>matrix</title></head><body></body></html>"

INSTRUMENT_JS = """(url) => {
  window.__reading = {events: [], opens: 0, end: null, text: "", calls: []};
  const r = window.__reading;
  const source = followAnswer(url, {
    onText: (piece) => { r.text += piece; },
    onDone: (done) => { r.end = {how: "done", payload: done}; r.calls.push(["done", done]); },
    onError: (error) => { r.end = {how: "error", payload: error}; r.calls.push(["error", error]); },
  });
  source.addEventListener("open", () => { r.opens += 1; });
  source.onmessage = (e) => r.events.push({type: "message", id: e.lastEventId, data: e.data});
  for (const type of ["token", "done", "error", "reasoning", "sources"]) {
    source.addEventListener(type, (e) => {
      if (typeof e.data === "string") r.events.push({type, id: e.lastEventId, data: e.data});
    });
  }
}"""


async def follow_chromium(browser: Any, base: str, path: str, *, deadline_s: float = 60) -> Reading:
    """Open a blank page on `base` (same origin as the stream), run the README snippet there, follow `path`."""
    reading = Reading("Chromium EventSource")
    context = await browser.new_context()
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.route(base + PAGE_PATH, lambda route: route.fulfill(body=PAGE, content_type="text/html"))
        await page.goto(base + PAGE_PATH)
        await page.add_script_tag(content=readme_snippet())
        await page.evaluate(INSTRUMENT_JS, base + path)
        await page.wait_for_function("() => window.__reading.end !== null", timeout=deadline_s * 1000)
        await asyncio.sleep(1.5)  # stay a while after the end, so that a reconnect would be seen
        state: dict[str, Any] = await page.evaluate("() => window.__reading")
        assert not errors, errors
    finally:
        await context.close()
    reading.connections = state["opens"]
    reading.events = [Seen(e["type"], e["data"], e["id"]) for e in state["events"]]
    reading.text = state["text"]
    reading.callbacks = [(how, payload) for how, payload in state["calls"]]
    end = state["end"]
    reading.end = "closed" if end["payload"].get("code") == "stream_closed" else "terminal"
    return reading
