"""The load generator's side of the wire: start an answer, read its events, time them.

`Frames` is a lean SSE splitter for the two servers measured here, which both end every line with CRLF
(`chatbot.events`'s convention); the tests' spec-complete parser (tests/sse.py) does a
Python step per character, which at tens of thousands of events a second would measure the load generator
instead of the service. The smoke test checks that both parsers agree on a real stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from .upstream import Script

SEP = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Frame:
    id: str
    event: str
    data: bytes

    def text(self) -> str:
        text: str = json.loads(self.data)["text"]
        return text


class Frames:
    """Feed body bytes; get the events they complete. Comments, `retry:` and blocks without data are skipped."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Frame]:
        *blocks, self._buffer = (self._buffer + chunk).split(SEP)
        out = []
        for block in blocks:
            event_id = event = ""
            data = None
            for line in block.split(b"\r\n"):
                if line.startswith(b"data: "):
                    data = line[6:]
                elif line.startswith(b"id: "):
                    event_id = line[4:].decode()
                elif line.startswith(b"event: "):
                    event = line[7:].decode()
            if data is not None:
                out.append(Frame(event_id, event or "message", data))
        return out


class RequestFailed(Exception):
    """A status the benchmark did not expect."""


async def start(http: aiohttp.ClientSession, base: str, script: Script) -> str:
    """POST /sessions; the new session's id."""
    async with http.post(base + "/sessions", json={"message": script.message()}) as response:
        if response.status != 201:
            raise RequestFailed(f"POST /sessions: {response.status} {await response.text()}")
        session_id: str = (await response.json())["id"]
        return session_id


async def frames(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[int, list[Frame]]]:
    """(receive time in ns, frames) for each read of an event-stream body, until it ends."""
    parser = Frames()
    while chunk := await response.content.readany():
        got = parser.feed(chunk)
        if got:
            yield time.monotonic_ns(), got


def events_request(
    http: aiohttp.ClientSession, base: str, session_id: str, last_id: str | None = None
) -> aiohttp.client._RequestContextManager:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    return http.get(f"{base}/events/{session_id}", headers=headers)


def connector() -> aiohttp.TCPConnector:
    """No cap on connections: 10,000 open streams need 10,000 of them."""
    return aiohttp.TCPConnector(limit=0, force_close=False)


def session(**kwargs: object) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    return aiohttp.ClientSession(connector=connector(), timeout=timeout, **kwargs)  # type: ignore[arg-type]
