"""The bytes of an event stream, exactly: no block without data ends in a blank line (issue 10, item 5)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import httpx_sse
import pytest
from aiohttp.test_utils import TestClient

from chatbot import events, eventstream
from chatbot.eventstream import HEARTBEAT
from chatbot.settings import Settings
from tests.helpers import create_session, wait_terminal

pytestmark = pytest.mark.timeout(30)

IDLE = {"heartbeat_seconds": 0.05, "demo_tokens_per_second": 4.0, "demo_answer_tokens": 100}
BLANK_LINE = b"\r\n\r\n"


def blocks_without_data(raw: bytes) -> list[bytes]:
    """Every block ended by a blank line that has no `data:` line (each would be a phantom event somewhere)."""
    *ended, _rest = raw.split(BLANK_LINE)
    return [block for block in ended if not re.search(rb"(^|\r\n)data: ", block)]


async def test_a_whole_stream_is_retry_then_the_frames_byte_for_byte(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    sid = (await create_session(client))["id"]
    parsed = (await wait_terminal(client, sid)).events
    async with client.get(f"/events/{sid}") as resp:
        raw = await resp.read()
    stored = [events.Event(e.id or "", e.type, e.data) for e in parsed]
    assert raw == b"retry: %d\r\n" % settings.sse_retry_ms + b"".join(events.frame(e) for e in stored)
    assert raw.count(BLANK_LINE) == len(stored)
    async with client.get(f"/events/{sid}", headers={"Last-Event-ID": stored[2].id}) as resumed:
        assert await resumed.read() == events.retry_field(settings.sse_retry_ms) + b"".join(
            events.frame(e) for e in stored[3:]
        )


@pytest.mark.settings(**IDLE)
async def test_heartbeats_are_single_comment_lines_between_events(client: TestClient[Any, Any]) -> None:
    sid = (await create_session(client))["id"]
    raw = b""
    async with client.get(f"/events/{sid}") as resp:
        async with asyncio.timeout(10):
            while raw.count(HEARTBEAT) < 6 or raw.count(b"event: token") < 2:
                raw += await resp.content.readany()
    assert raw.startswith(b"retry: 1000\r\n")
    assert blocks_without_data(raw) == [], raw[:400]
    # Taking the heartbeats out leaves exactly retry + whole frames (+ a frame still arriving).
    frames = raw.replace(HEARTBEAT, b"")[len(b"retry: 1000\r\n") :]
    for block in frames.split(BLANK_LINE)[:-1]:
        assert re.fullmatch(rb"id: \d+-\d+\r\nevent: token\r\ndata: \{.*\}", block), block


@pytest.mark.settings(**IDLE)
async def test_httpx_sse_sees_no_phantom_events(client: TestClient[Any, Any]) -> None:
    """httpx-sse dispatched an empty `message` for every blank line after `retry:` or a `: ping`."""
    sid = (await create_session(client))["id"]
    seen: list[httpx_sse.ServerSentEvent] = []
    async with (
        httpx.AsyncClient(base_url=str(client.make_url(""))) as http,
        httpx_sse.aconnect_sse(http, "GET", f"/events/{sid}") as source,
        asyncio.timeout(10),
    ):
        async for sse in source.aiter_sse():
            seen.append(sse)
            if len(seen) == 4:
                break
    assert [sse.event for sse in seen] == ["token"] * 4
    assert all(sse.json()["text"] for sse in seen)
    assert seen[0].retry == 1000


@pytest.mark.settings(**IDLE)
async def test_every_open_stream_gets_its_heartbeats_when_a_round_is_written_in_slices(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round writes SLICE heartbeats per turn of the event loop (so 10,000 streams do not hold answers back)."""
    monkeypatch.setattr(eventstream, "SLICE", 2)
    sid = (await create_session(client))["id"]
    responses = [await client.get(f"/events/{sid}") for _ in range(5)]

    async def heartbeats(resp: Any) -> int:
        raw = b""
        async with asyncio.timeout(10):
            while raw.count(HEARTBEAT) < 3:
                raw += await resp.content.readany()
        return raw.count(HEARTBEAT)

    try:
        assert min(await asyncio.gather(*(heartbeats(r) for r in responses))) >= 3
    finally:
        for resp in responses:
            resp.close()
