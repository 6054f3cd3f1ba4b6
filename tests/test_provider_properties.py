"""Property: whatever JSON an upstream puts in any field of its events, a provider yields only `str` and
`Reasoning`, then exactly one `Finish` as its last item, or raises its own ProviderError; nothing else.

The events start as the real shapes of each API (tests/providers_fakes.py and the replays) and any one
value, at any depth, is replaced by any JSON value; the bytes go through the same reader and parser the
service runs (`relay_body` pushing a response body's pieces into the parser).
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbot.providers import Finish, ProviderError, Reasoning
from chatbot.providers.anthropic_messages import EventParser
from chatbot.providers.http1 import Body
from chatbot.providers.openai_compat import ChunkParser
from chatbot.providers.transport import EventParser as Parser
from chatbot.providers.transport import items, relay_body

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)

OPENAI: list[Any] = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "Hi"}]}, "finish_reason": None}]},
    {
        "choices": [
            {"index": 0, "delta": {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "h"}]}]}}
        ]
    },
    {"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
    {"choices": [{"index": 0, "delta": {"reasoning": "think", "content": None}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    {
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        "error": {"code": 502, "message": "x"},
    },
    {"error": {"message": "Rate limit", "code": "rate_limit_exceeded"}},
    {"object": "error", "message": "bad", "code": 500},
    {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
]
ANTHROPIC: list[Any] = [
    {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "h"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "ping"},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
    {"type": "message_stop"},
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place a value sits in a JSON document, the document itself first."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths(inner, (*prefix, index))
    return found


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    document = copy.deepcopy(document)
    holder = document
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return document


@st.composite
def event_streams(draw: st.DrawFn, templates: list[Any], last: bytes) -> bytes:
    """A few events of the API's shapes, one value anywhere in each possibly replaced, then maybe the last event."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        event = draw(st.sampled_from(templates))
        if draw(st.booleans()):
            event = replaced(event, draw(st.sampled_from(paths(event))), draw(JSON))
        out.append(b"data: " + json.dumps(event).encode() + b"\n\n")
    if draw(st.booleans()):
        out.append(last)
    return b"".join(out)


async def relay(raw: bytes, parser: Parser) -> list[Any]:
    body = Body(None)
    body.feed(raw)
    body.feed_eof()
    got: list[Any] = []
    try:
        async for item in items(lambda sink: relay_body(body, parser, sink)):
            got.append(item)
    except ProviderError as exc:
        assert isinstance(exc.code, str) and isinstance(exc.message, str) and isinstance(exc.retryable, bool)
        got.append(exc)
    return got


def check(items: list[Any]) -> None:
    *body, last = items
    for item in body:
        assert type(item) is str or (type(item) is Reasoning and type(item.text) is str), item
    assert type(last) in (Finish, ProviderError), last
    if isinstance(last, Finish):
        assert last.finish_reason in ("stop", "length", "content_filter")
        assert last.usage is None or (type(last.usage.input_tokens) is int and type(last.usage.output_tokens) is int)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(event_streams(OPENAI, b"data: [DONE]\n\n"))
def test_openai_yields_only_text_then_one_finish_or_raises_its_own_error(raw: bytes) -> None:
    check(asyncio.run(relay(raw, ChunkParser())))


@PROPERTY
@given(event_streams(ANTHROPIC, b'event: message_stop\ndata: {"type":"message_stop"}\n\n'))
def test_anthropic_yields_only_text_then_one_finish_or_raises_its_own_error(raw: bytes) -> None:
    check(asyncio.run(relay(raw, EventParser())))


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from([ChunkParser, EventParser]))
def test_any_bytes_as_an_event_yield_nothing_else(data: bytes, parser: type[Parser]) -> None:
    check(asyncio.run(relay(b"data: " + data.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n\n", parser())))
