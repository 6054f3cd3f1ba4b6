"""Server-Sent Events from an upstream's raw body: the `data` of each event, as bytes. Pure, no I/O.

Lines split only on CR LF, CR and LF, as the SSE spec says (never on U+2028 and
friends). Those are ASCII bytes that never occur inside a multi-byte UTF-8
character, so splitting bytes is safe and a character cut by a network read
stays whole in the buffered line; each data payload is decoded once, complete,
by `loads`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes) -> Any:
    """One event's JSON data as Python values; ValueError (json.JSONDecodeError, UnicodeDecodeError) if it is not JSON.

    orjson parses it, in a quarter of `json.loads`'s CPU on a Chat Completions chunk (bench/RESULTS.md);
    what orjson refuses goes to `json.loads`, whose verdict stands, so no data that `json` accepted is
    refused now (NaN, Infinity, numbers out of a double's range, escaped lone surrogates, a byte order
    mark). Two differences remain: an integer beyond 64 bits comes back as a float, and arrays or objects
    nested 1,000 to 1,024 deep are read (json's recursion limit refused them; orjson's is 1,024).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class SSEDecoder:
    """Feed it body bytes as they arrive; it returns the data of each event they complete."""

    __slots__ = ("_data", "_skip_lf", "_tail")

    def __init__(self) -> None:
        self._tail = b""  # the unfinished last line
        self._skip_lf = False  # the last chunk ended in CR: a LF that starts the next one ends nothing
        self._data: list[bytes] = []  # data lines of the event being read

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        return self._lines(lines) if lines else []

    def flush(self) -> None:
        """At the end of the body an unfinished event is dropped, as the spec says."""
        self._tail = b""
        self._data.clear()

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            # event:, id:, retry: and :comments carry nothing a provider needs here
        return out
