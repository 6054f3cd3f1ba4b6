"""The SSE decoder, the chunk parsers and the history format, byte for byte, without a server."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatbot import history
from chatbot.app import make_provider
from chatbot.providers import Finish, Reasoning, Usage
from chatbot.providers.anthropic_messages import EventParser
from chatbot.providers.openai_compat import ChunkParser
from chatbot.providers.sse_decoder import SSEDecoder, loads
from chatbot.settings import Settings, SettingsError
from tests.providers_fakes import anthropic_events, openai_events

TEXT = ["a😀", "\u2028b", "c\r\nd", 'e"\\', "data: x\n\nid: 9"]


def feed_bytewise(raw: bytes) -> list[bytes]:
    decoder = SSEDecoder()
    out: list[bytes] = []
    for i in range(len(raw)):
        out += decoder.feed(raw[i : i + 1])
    return out


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_decoder_splits_only_on_sse_line_breaks_whatever_the_reads(newline: bytes) -> None:
    raw = b"".join(openai_events(TEXT)).replace(b"\n", newline)
    datas = feed_bytewise(raw)
    assert datas[-1] == b"[DONE]"
    texts = [c["choices"][0]["delta"].get("content") for c in map(json.loads, datas[:-1]) if c["choices"]]
    assert "".join(t for t in texts if t) == "".join(TEXT)


def test_decoder_joins_data_lines_and_ignores_other_fields() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": comment\nevent: x\nid: 1\nretry: 5\ndata:a\ndata: b\ndata:  c\n") == []
    assert decoder.feed(b"\n") == [b"a\nb\n c"]
    assert decoder.feed(b"data: unfinished") == []
    decoder.flush()
    assert decoder.feed(b"\n\n") == []


# What json.loads accepts and orjson refuses, or reads otherwise; `loads` must give json's verdict on each.
JSON_EDGES = [
    b"NaN",
    b'{"a": -Infinity}',
    b'{"a": 1e999}',
    b'"\\ud800 lone surrogate"',
    b"\xef\xbb\xbf{}",  # a byte order mark
    b'{"a": "\xff"}',  # not UTF-8
    b"[1,]",
    b"",
    b'{"a": 1, "a": 2}',
    b'  {"choices": [{"delta": {"content": "caf\\u00e9"}}]}  ',
]


def _verdict(parse: Any, data: bytes) -> Any:
    try:
        value = parse(data)
    except ValueError as exc:
        return type(exc)
    return "nan" if isinstance(value, float) and math.isnan(value) else value


@pytest.mark.parametrize("data", JSON_EDGES)
def test_event_data_is_read_as_json_reads_it(data: bytes) -> None:
    assert _verdict(loads, data) == _verdict(json.loads, data)


def test_event_data_is_parsed_by_orjson() -> None:
    # The documented difference, and the proof that orjson, not json, read it: json keeps the integer.
    assert loads(b"18446744073709551616") == 18446744073709551616.0
    assert type(loads(b"18446744073709551616")) is float


_SMALL_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_JSON = st.recursive(
    st.none() | st.booleans() | _SMALL_INTS | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(_JSON, st.booleans())
def test_any_json_within_64_bit_integers_is_read_as_json_reads_it(value: Any, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert _verdict(loads, data) == _verdict(json.loads, data)


def test_openai_parser_keeps_text_finish_and_usage() -> None:
    parser, texts = ChunkParser(), list[str | Reasoning]()
    finish = parser.take(feed_bytewise(b"".join(openai_events(TEXT, finish_reason="length"))), texts)
    assert texts == [t for t in TEXT if t] and all(type(t) is str for t in texts)
    assert finish == Finish("length", Usage(7, 11))


def test_anthropic_parser_keeps_text_stop_reason_and_usage() -> None:
    parser, texts = EventParser(), list[str | Reasoning]()
    finish = parser.take(feed_bytewise(b"".join(anthropic_events(TEXT, stop_reason="max_tokens"))), texts)
    assert texts == [t for t in TEXT if t] and all(type(t) is str for t in texts)
    assert finish == Finish("length", Usage(7, 11))


def test_history_turns_round_trip_and_lead_with_their_length() -> None:
    turn = history.Turn("q\u2028😀", 'a "b"\n')
    raw = history.encode(turn)
    assert raw.startswith(f"{len('q') + 2 + 6}\n")
    assert history.decode(raw) == turn
    messages = history.messages("sys", [turn], "next")
    assert [(m.role, m.content) for m in messages] == [
        ("system", "sys"), ("user", turn.user), ("assistant", turn.assistant), ("user", "next"),
    ]  # fmt: skip


def test_system_prompt_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "prompt.txt"
    path.write_text("  You are terse. ✓\n", encoding="utf-8")
    assert Settings.from_env({"CHATBOT_SYSTEM_PROMPT_FILE": str(path)}).system_prompt == "You are terse. ✓"


def test_unreadable_system_prompt_file_names_the_variable_and_the_file() -> None:
    with pytest.raises(SettingsError, match=r"CHATBOT_SYSTEM_PROMPT_FILE '/nonexistent/p\.txt'"):
        Settings.from_env({"CHATBOT_SYSTEM_PROMPT_FILE": "/nonexistent/p.txt"})


def test_sdk_providers_need_a_model() -> None:
    with pytest.raises(SettingsError, match="CHATBOT_MODEL"):
        Settings.from_env({"CHATBOT_PROVIDER": "openai"})


def test_openai_without_a_key_fails_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = Settings.from_env({"CHATBOT_PROVIDER": "openai", "CHATBOT_MODEL": "m"})
    with pytest.raises(SettingsError, match="OPENAI_API_KEY"):
        make_provider(settings)
