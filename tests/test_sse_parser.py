"""The test-side SSE parser itself follows the spec; the other tests rely on it."""

from __future__ import annotations

import pytest

from tests.sse import SSEParser

STREAM = (
    "\ufeffretry: 1000\r\n"
    ": ping\r\n"
    "\r\n"
    "id: 1-0\r\nevent: token\r\ndata: {\"text\": \"caf\u00e9 \u2028 \u0085 \x0b\x0c \U0001f600\"}\r\n\r\n"
    "id: 1-1\revent: token\rdata:a\rdata: b\r\r"
    "id: 2-0\nevent: done\ndata\n\n"
    "data: no-type\n\n"
    "id: 3-0\nevent: token\ndata: partial"
).encode()


def parse_in_chunks(raw: bytes, size: int) -> SSEParser:
    parser = SSEParser()
    for i in range(0, len(raw), size):
        parser.feed(raw[i : i + size])
    parser.close()
    return parser


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
def test_parser_is_chunking_invariant(size: int) -> None:
    parser = parse_in_chunks(STREAM, size)
    events = [item for kind, item in parser.items if kind == "event"]
    assert parser.retries == [1000]
    assert parser.comments == [" ping"]
    assert [(e.id, e.type, e.data, e.data_lines) for e in events] == [
        ("1-0", "token", '{"text": "caf\u00e9 \u2028 \u0085 \x0b\x0c \U0001f600"}', 1),
        ("1-1", "token", "a\nb", 2),
        ("2-0", "done", "", 1),
        (None, "message", "no-type", 1),
    ]
    assert events[-1].last_event_id == "2-0"
    # the unterminated last block is discarded at end of stream
    assert parser.last_event_id == "3-0"


def test_parser_rejects_truncated_utf8() -> None:
    parser = SSEParser()
    parser.feed("data: \U0001f600".encode()[:-1])
    with pytest.raises(UnicodeDecodeError):
        parser.close()
