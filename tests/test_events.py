"""The wire format, byte for byte, without a server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot import events
from chatbot.events import Event
from chatbot.eventstream import HEARTBEAT


def test_token_frame_bytes() -> None:
    event = Event("1700000000000-0", events.TOKEN, events.token_data("Hello"))
    assert events.frame(event) == b'id: 1700000000000-0\r\nevent: token\r\ndata: {"text":"Hello"}\r\n\r\n'


def test_done_frame_bytes_with_usage() -> None:
    data = events.done_data("length", {"input_tokens": 3, "output_tokens": 7})
    framed = events.frame(Event("5-1", events.DONE, data))
    assert framed == (
        b"id: 5-1\r\nevent: done\r\n"
        b'data: {"finish_reason":"length","usage":{"input_tokens":3,"output_tokens":7}}\r\n\r\n'
    )


def test_error_frame_bytes() -> None:
    data = events.error_data("producer_lost", "It stopped.", retryable=True)
    assert events.frame(Event("9-0", events.ERROR, data)) == (
        b'id: 9-0\r\nevent: error\r\ndata: {"code":"producer_lost","message":"It stopped.","retryable":true}\r\n\r\n'
    )


def test_retry_field_is_one_line_without_a_blank_line() -> None:
    # A blank line after a block without data makes httpx-sse yield an empty event (issue 10, item 5).
    assert events.retry_field(1500) == b"retry: 1500\r\n"
    assert events.retry_field(0) == b"retry: 0\r\n"
    with pytest.raises(ValueError):
        events.retry_field(-1)


def test_comment_is_one_line_without_a_blank_line() -> None:
    assert events.comment("store_unavailable") == b": store_unavailable\r\n"
    assert HEARTBEAT == b": ping\r\n"
    with pytest.raises(ValueError):
        events.comment("two\nlines")


TRICKY = [
    "line one\nline two\r\nthree\rfour",
    "data: x\n\nid: 9\nevent: done",
    "\u2028 and \u2029 and \x85 and \x0b \x0c",
    "emoji 👩‍💻 and 中文 and é (e\u0301)",
    '"quotes" and \\backslashes\\ and <script>alert(1)</script>',
    "\x00 nul and \x1b escape",
]


@pytest.mark.parametrize("text", TRICKY)
def test_any_text_is_one_data_line_and_round_trips(text: str) -> None:
    framed = events.frame(Event("1-0", events.TOKEN, events.token_data(text)))
    lines = framed.split(b"\r\n")
    # id, event, data, then the blank line that ends the event: nothing the text holds starts a new field.
    assert lines[:2] == [b"id: 1-0", b"event: token"]
    assert lines[3:] == [b"", b""]
    # The SSE spec splits lines only on CR, LF and CRLF; none may appear inside the data line.
    assert b"\r" not in lines[2] and b"\n" not in lines[2]
    assert json.loads(lines[2].removeprefix(b"data: ").decode("utf-8")) == {"text": text}


def test_text_is_not_ascii_escaped() -> None:
    assert events.token_data("é👍\u2028") == '{"text":"é👍\u2028"}'


@pytest.mark.parametrize(("field", "value"), [("id", "1-0\nevent: x"), ("id", "1\r0"), ("event", "token\ndata: x")])
def test_injection_into_id_or_event_is_refused(field: str, value: str) -> None:
    kwargs = {"id": "1-0", "event": "token", "data": "{}"} | {field: value}
    with pytest.raises(ValueError):
        events.frame(Event(**kwargs))


def test_multiline_data_is_refused() -> None:
    with pytest.raises(ValueError):
        events.frame(Event("1-0", "token", "a\nb"))


@pytest.mark.parametrize("raw", ["1700000000000-0", "0-0", "18446744073709551615-18446744073709551615"])
def test_event_ids_parse(raw: str) -> None:
    ms, seq = raw.split("-")
    assert events.parse_event_id(raw) == (int(ms), int(seq))


@pytest.mark.parametrize(
    "raw", ["", "12", "1-", "-1", "1-0-0", "a-b", " 1-0", "1-0\n", "1-0 ", "18446744073709551616-0", "1" * 21 + "-0"]
)
def test_malformed_event_ids_are_refused(raw: str) -> None:
    with pytest.raises(events.BadEventId):
        events.parse_event_id(raw)


def test_event_ids_compare_numerically() -> None:
    assert events.parse_event_id("10-0") > events.parse_event_id("9-5")
    assert events.parse_event_id("9-10") > events.parse_event_id("9-9")


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_token_and_reasoning_data_are_the_json_of_their_text(text: str) -> None:
    expected = json.dumps({"text": text}, ensure_ascii=False, separators=(",", ":"))
    assert events.token_data(text) == expected == events.reasoning_data(text)
    assert json.loads(expected) == {"text": text}
