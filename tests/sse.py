"""A small incremental Server-Sent Events parser that follows the WHATWG spec to the letter.

Bytes go in as they arrive from the network (a UTF-8 character may be split across chunks), are decoded
with an incremental decoder, cut into lines only on CRLF, CR or LF (never `str.splitlines()`, which also
cuts on U+2028, U+0085, ...), and turned into events. Comments and `retry:` values are recorded too, so
tests can see heartbeats and the reconnection delay. Shared by the tests and the benchmark.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: `id` is the id field seen in this event's block (None if it had none)."""

    type: str
    data: str
    id: str | None
    last_event_id: str
    data_lines: int

    def json(self) -> Any:
        import json

        return json.loads(self.data)


@dataclass(slots=True)
class SSEParser:
    """Feed bytes with `feed`; it returns the events completed by them."""

    comments: list[str] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    # every item in wire order: ("event", Event) | ("comment", str) | ("retry", int)
    items: list[tuple[str, Any]] = field(default_factory=list)
    last_event_id: str = ""
    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="strict"))
    _buffer: str = ""
    _pending_cr: bool = False
    _first: bool = True
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _block_id: str | None = None
    _block_has_fields: bool = False

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        return self._feed_text(text)

    def close(self) -> list[Event]:
        """End of stream: flush the decoder (raises on a truncated UTF-8 sequence); a partial event is dropped."""
        self._decoder.decode(b"", final=True)
        return []

    def _feed_text(self, text: str) -> list[Event]:
        events: list[Event] = []
        for line in self._lines(text):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> list[str]:
        lines: list[str] = []
        buf = self._buffer
        i = 0
        if self._pending_cr and text:
            # a CR ended the previous chunk; an LF starting this one belongs to the same line break
            self._pending_cr = False
            if text[0] == "\n":
                i = 1
        start = i
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == "\r" or ch == "\n":
                lines.append(buf + text[start:i])
                buf = ""
                if ch == "\r":
                    if i + 1 < n:
                        if text[i + 1] == "\n":
                            i += 1
                    else:
                        self._pending_cr = True
                i += 1
                start = i
            else:
                i += 1
        self._buffer = buf + text[start:]
        return lines

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            self.items.append(("comment", line[1:]))
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._block_has_fields = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
                self._block_id = value
        elif name == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.retries.append(int(value))
                self.items.append(("retry", int(value)))
        return None

    def _dispatch(self) -> Event | None:
        data, type_, block_id = self._data, self._type, self._block_id
        self._data, self._type, self._block_id, self._block_has_fields = [], "", None, False
        if not data:
            return None
        event = Event(
            type=type_ or "message",
            data="\n".join(data),
            id=block_id,
            last_event_id=self.last_event_id,
            data_lines=len(data),
        )
        self.items.append(("event", event))
        return event


class _Content(Protocol):
    async def readany(self) -> bytes: ...


class _Response(Protocol):
    @property
    def content(self) -> _Content: ...


async def iter_events(response: _Response, parser: SSEParser | None = None) -> AsyncIterator[Event]:
    """Yield the events of an aiohttp response body as they complete, until the server ends it."""
    parser = SSEParser() if parser is None else parser
    while True:
        chunk = await response.content.readany()
        if not chunk:
            parser.close()
            return
        for event in parser.feed(chunk):
            yield event


async def read_all(response: _Response, parser: SSEParser | None = None) -> list[Event]:
    """All events of a response body, read to its end."""
    return [event async for event in iter_events(response, parser)]
