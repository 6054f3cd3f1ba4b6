# ruff: noqa: F811  (the fixtures imported from test_providers_upstream are parameters here)
"""Stream shapes real upstreams send, replayed byte for byte through the service (issue 9).

Each handed input from the issue is kept with its exact bytes (`ISSUE_*`); beside it, other inputs of
the same kind as OpenAI-compatible servers (Azure, OpenRouter, Ollama, vLLM, DeepSeek, Mistral, LiteLLM,
llama.cpp) and Anthropic's API publicly document them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.helpers import create_session, get_session, read_stream, text_of, wait_terminal
from tests.providers_fakes import FakeUpstream, Reply
from tests.test_providers_upstream import (  # noqa: F401  (fixtures)
    answer,
    api,
    done_payload,
    error_payload,
    provider_settings,
    serve,
    upstream,
)

pytestmark = pytest.mark.timeout(30)

DONE = b"data: [DONE]\n\n"


def oa(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One Chat Completions chunk as most servers write it."""
    choice = {"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def an(kind: str, **body: Any) -> bytes:
    """One Messages stream event."""
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **body}).encode() + b"\n\n"


ANTHROPIC_START = an(
    "message_start",
    message={"id": "m", "type": "message", "role": "assistant", "content": [], "usage": {"input_tokens": 3}},
)


async def run(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, *replies: Reply, **settings: Any
) -> tuple[Any, dict[str, Any], Any]:
    upstream.script(*replies)
    client = await serve(provider_settings(api, upstream, monkeypatch, **settings))
    created, stream = await answer(client)
    return client, created, stream


# -- 1. content as a list of parts: text parts are the answer; the instance goes on --------------------------

ISSUE_1 = [
    b'data: {"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"Hi"}]},"finish_reason":null}]}\n\n',
    b"data: [DONE]\n\n",
]


async def test_issue_1_content_list_is_read_and_the_next_answer_works(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    client, _, stream = await run(
        "openai", upstream, monkeypatch, serve, Reply(ISSUE_1), Reply([oa({"content": "Next"}, "stop"), DONE])
    )
    assert text_of(stream.events) == "Hi"
    assert done_payload(stream)["finish_reason"] == "stop"
    _, second = await answer(client)
    assert text_of(second.events) == "Next" and done_payload(second)["finish_reason"] == "stop"


async def test_mistral_thinking_parts_are_reasoning_and_text_parts_the_answer(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "Six times seven."}]}
    pieces = [
        oa({"role": "assistant", "content": [thinking]}),
        oa({"content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]}),
        oa({"content": ""}, "stop"),
        DONE,
    ]
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(pieces))
    assert [e.type for e in stream.events] == ["reasoning", "token", "done"]
    session = await get_session(client, created["id"])
    assert (session["text"], session["reasoning"]) == ("42", "Six times seven.")


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {"url": "https://x"}}],  # a part that is neither text nor thinking
        42,  # a number
        {"type": "text", "text": "Hi"},  # one part, not a list
        [{"type": "text", "text": 7}],  # a text part whose text is not a string
    ],
)
async def test_content_of_another_shape_is_a_bad_response_and_the_next_answer_works(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, content: Any
) -> None:
    pieces = [oa({"content": "Before "}), oa({"content": content}), DONE]
    client, created, stream = await run(
        "openai", upstream, monkeypatch, serve, Reply(pieces), Reply([oa({"content": "Fine"}, "stop"), DONE])
    )
    error = error_payload(stream)
    assert (error["code"], error["retryable"]) == ("upstream_bad_response", False)
    assert (await get_session(client, created["id"]))["text"] == "Before "
    _, second = await answer(client)
    assert text_of(second.events) == "Fine"


# -- 2. in-band error objects ------------------------------------------------------------------------------

ISSUE_2 = [
    b'data: {"choices":[{"index":0,"delta":{"content":"The answer is"},"finish_reason":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}],'
    b'"error":{"code":502,"message":"x"}}\n\n',  # one line on the wire; split here for the line length
    b"data: [DONE]\n\n",
]


async def test_issue_2_error_with_finish_reason_error_is_an_error_keeping_the_text(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(ISSUE_2))
    error = error_payload(stream)
    assert error["message"].endswith("It said: “x”")
    assert error["retryable"] is True
    session = await get_session(client, created["id"])
    assert (session["status"], session["text"]) == ("failed", "The answer is")


@pytest.mark.parametrize(
    ("failure", "code", "said"),
    [
        # OpenRouter: a provider failed mid-answer; the error object sits beside choices, no [DONE] follows
        (
            b'data: {"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m","provider":"p",'
            b'"error":{"code":"server_error","message":"Provider disconnected unexpectedly"},'
            b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n',
            "upstream_error",
            "Provider disconnected unexpectedly",
        ),
        # vLLM: its error response written as a chunk, no choices and no `error` key
        (
            b'data: {"object":"error","message":"The model ran out of KV cache","type":"InternalServerError",'
            b'"param":null,"code":500}\n\n' + DONE,
            "upstream_unavailable",
            "The model ran out of KV cache",
        ),
        # LiteLLM: an error object alone, the status as a string
        (
            b'data: {"error":{"message":"litellm.APIConnectionError: upstream closed","type":null,'
            b'"param":null,"code":"500"}}\n\n',
            "upstream_unavailable",
            "litellm.APIConnectionError: upstream closed",
        ),
        # finish_reason "error" with no error object at all
        (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"error"}]}\n\n' + DONE, "upstream_error", ""),
    ],
)
async def test_in_band_errors_end_the_answer_with_the_providers_message(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, failure: bytes, code: str, said: str
) -> None:
    client, created, stream = await run(
        "openai", upstream, monkeypatch, serve, Reply([oa({"content": "Partly"}), failure])
    )
    error = error_payload(stream)
    assert error["code"] == code
    assert said in error["message"]
    assert (await get_session(client, created["id"]))["text"] == "Partly"


async def test_anthropic_error_event_carries_its_message(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    failure = (
        b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}\n\n'
    )
    pieces = [ANTHROPIC_START, an("content_block_delta", index=0, delta={"type": "text_delta", "text": "Par"}), failure]
    _, _, stream = await run("anthropic", upstream, monkeypatch, serve, Reply(pieces))
    error = error_payload(stream)
    assert error["code"] == "upstream_unavailable" and "Internal server error" in error["message"]


async def test_a_key_quoted_in_an_upstream_error_never_reaches_the_reader(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    failure = b'data: {"error":{"message":"Incorrect API key provided: sk-proj-abcdefghijklmnop1234. Check it."}}\n\n'
    _, _, stream = await run("openai", upstream, monkeypatch, serve, Reply([failure]))
    message = error_payload(stream)["message"]
    assert "Incorrect API key provided" in message and "abcdefghijklmnop" not in message


# -- 3. nothing at all, or reasoning alone: empty_answer ------------------------------------------------------

ISSUE_3 = [b"data: [DONE]\n\n"]
ISSUE_3_LLAMA_CPP = [b'error: {"code":500,"message":"context overflow","type":"server_error"}\n\n', b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    "pieces",
    [
        ISSUE_3,
        ISSUE_3_LLAMA_CPP,
        [oa({"role": "assistant", "content": ""}), oa({}, "stop"), DONE],  # Ollama: a finish and nothing else
        [oa({"content": "  \n"}, "stop"), DONE],  # whitespace only
    ],
)
async def test_issue_3_no_text_is_an_empty_answer(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, pieces: list[bytes]
) -> None:
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(pieces))
    error = error_payload(stream)
    assert (error["code"], error["retryable"]) == ("empty_answer", True)
    assert (await get_session(client, created["id"]))["status"] == "failed"


async def test_anthropic_message_without_text_is_an_empty_answer(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    pieces = [ANTHROPIC_START, an("message_delta", delta={"stop_reason": "end_turn"}), an("message_stop")]
    _, _, stream = await run("anthropic", upstream, monkeypatch, serve, Reply(pieces))
    assert error_payload(stream)["code"] == "empty_answer"


async def test_reasoning_alone_is_an_empty_answer_and_stays_readable(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    pieces = [oa({"reasoning_content": "Hmm."}), oa({"reasoning_content": " Let me see."}, "stop"), DONE]
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(pieces))
    assert error_payload(stream)["code"] == "empty_answer"
    assert text_of(stream.events, "reasoning") == "Hmm. Let me see."
    assert (await get_session(client, created["id"]))["reasoning"] == "Hmm. Let me see."


# -- 4. the model's own finish ends the answer, [DONE] or not ---------------------------------------------------

ISSUE_4 = [b'data: {"choices":[{"index":0,"delta":{"content":"All done."},"finish_reason":"stop"}]}\n\n']


@pytest.mark.parametrize(
    ("pieces", "then", "reason"),
    [
        (ISSUE_4, "end", "stop"),
        (ISSUE_4, "drop", "stop"),  # the connection dropped after the finish: the answer was complete
        ([oa({"content": "All done."}), oa({}, "length")], "end", "length"),
        # Azure: a prompt-filter chunk without choices first, then the answer cut by the content filter
        (
            [
                b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
                b'[{"prompt_index":0,"content_filter_results":{}}]}\n\n',
                oa({"content": "All done."}),
                oa({}, "content_filter", usage=None),
            ],
            "end",
            "content_filter",
        ),
    ],
)
async def test_issue_4_a_finish_reason_then_the_end_of_the_body_is_done(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, pieces: list[bytes], then: str, reason: str
) -> None:
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(pieces, then=then))
    assert done_payload(stream)["finish_reason"] == reason
    session = await get_session(client, created["id"])
    assert (session["status"], session["text"]) == ("done", "All done.")


async def test_anthropic_refusal_is_content_filter(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    pieces = [
        ANTHROPIC_START,
        an("content_block_delta", index=0, delta={"type": "text_delta", "text": "I can't"}),
        an("message_delta", delta={"stop_reason": "refusal"}, usage={"output_tokens": 2}),
        an("message_stop"),
    ]
    _, _, stream = await run("anthropic", upstream, monkeypatch, serve, Reply(pieces))
    assert done_payload(stream) == {"finish_reason": "content_filter", "usage": {"input_tokens": 3, "output_tokens": 2}}


# -- 5. a body that is not an event stream ------------------------------------------------------------------------

ISSUE_5 = Reply([b"<html><body>hi</body></html>"], headers={"Content-Type": "text/html"})


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (ISSUE_5, ["text/html", "<html><body>hi</body></html>"]),
        # a server that ignored stream: true and answered with one JSON completion
        (
            Reply(
                [b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}'],
                headers={"Content-Type": "application/json"},
            ),
            ["application/json", '{"id":"chatcmpl-1"'],
        ),
        # a proxy's plain-text page that quotes the request's key
        (
            Reply(
                [b"Bad gateway. Authorization: Bearer sk-live-0123456789abcdef"], headers={"Content-Type": "text/plain"}
            ),
            ["text/plain", "Bad gateway"],
        ),
    ],
)
async def test_issue_5_a_body_that_is_not_an_event_stream_is_a_bad_response(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, reply: Reply, named: list[str]
) -> None:
    _, _, stream = await run(api, upstream, monkeypatch, serve, reply)
    error = error_payload(stream)
    assert (error["code"], error["retryable"]) == ("upstream_bad_response", False)
    for part in named:
        assert part in error["message"]
    assert "sk-" not in error["message"] and "0123456789abcdef" not in error["message"]


# -- 6. keep-alives after the model's end cannot hold the answer open ----------------------------------------------

ISSUE_6 = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    b'"content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":5,"output_tokens":1}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":2}}\n\n',
]
ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


@pytest.mark.parametrize(
    ("api", "pieces", "keepalive"),
    [
        ("anthropic", ISSUE_6, ANTHROPIC_PING),
        ("openai", [oa({"content": "Hello"}), oa({}, "stop")], b": keep-alive\n\n"),  # a proxy's comment pings
        ("openai", [oa({"content": "Hello"}), oa({}, "stop")], b": OPENROUTER PROCESSING\n\n"),
    ],
)
async def test_issue_6_pings_after_the_stop_reason_end_within_a_second(
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    serve: Any,
    api: str,
    pieces: list[bytes],
    keepalive: bytes,
) -> None:
    upstream.script(Reply(pieces, forever=keepalive, every=1.0))  # pings once a second, as the issue saw them
    client = await serve(provider_settings(api, upstream, monkeypatch, upstream_idle_timeout_seconds=5.0))
    loop = asyncio.get_running_loop()
    created = await create_session(client, "Hi")
    started = loop.time()
    stream = await wait_terminal(client, created["id"])
    assert loop.time() - started < 1.0
    assert done_payload(stream)["finish_reason"] == "stop"
    assert text_of(stream.events) == "Hello"
    await asyncio.wait_for(upstream.disconnected.wait(), 3)


async def test_answer_deadline_cuts_an_answer_that_keeps_talking(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    _, _, stream = await run(
        "openai",
        upstream,
        monkeypatch,
        serve,
        Reply([oa({"content": "Start"})], pause=0.1, forever=b": keep-alive\n\n"),
        answer_deadline_seconds=1.0,
    )
    error = error_payload(stream)
    assert error["code"] == "upstream_timeout" and "1s" in error["message"]
    assert text_of(stream.events) == "Start"


# -- 7. a rate limit in the middle of an answer ---------------------------------------------------------------------

ISSUE_7 = (
    b'data: {"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min.",'
    b'"type":"tokens","param":null,"code":"rate_limit_exceeded"}}\n\n'
)


@pytest.mark.parametrize(
    ("api", "failure"),
    [
        ("openai", ISSUE_7),
        (
            "openai",
            b'data: {"error":{"code":429,"message":"Rate limit exceeded: free-models-per-day"}}\n\n',
        ),  # OpenRouter
        ("openai", b'data: {"error":{"message":"litellm.RateLimitError: quota","type":null,"code":"429"}}\n\n'),
        (
            "anthropic",
            b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}\n\n',
        ),
    ],
)
async def test_issue_7_mid_stream_rate_limit_is_upstream_rate_limited(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, api: str, failure: bytes
) -> None:
    first = oa({"content": "Some"}) if api == "openai" else ANTHROPIC_START
    _, _, stream = await run(api, upstream, monkeypatch, serve, Reply([first, failure]))
    error = error_payload(stream)
    assert (error["code"], error["retryable"]) == ("upstream_rate_limited", True)


# -- reasoning: its own event, stored, resumable, never the answer ---------------------------------------------------

REASONING_SHAPES = {
    "deepseek": [
        oa({"role": "assistant", "content": None, "reasoning_content": ""}),
        oa({"content": None, "reasoning_content": "First, "}),
        oa({"content": None, "reasoning_content": "add."}),
        oa({"content": "Two", "reasoning_content": None}),
        oa({"content": "."}, "stop"),
        DONE,
    ],
    "openrouter": [
        oa({"role": "assistant", "content": "", "reasoning": "First, "}),
        oa({"content": "", "reasoning": "add."}),
        oa({"content": "Two."}, "stop"),
        DONE,
    ],
    "ollama": [oa({"role": "assistant", "content": "", "reasoning": "First, add."}), oa({"content": "Two."}, "stop")],
}


@pytest.mark.parametrize("shape", sorted(REASONING_SHAPES))
async def test_reasoning_deltas_become_reasoning_events(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, shape: str
) -> None:
    client, created, stream = await run("openai", upstream, monkeypatch, serve, Reply(REASONING_SHAPES[shape]))
    assert text_of(stream.events, "reasoning") == "First, add."
    assert text_of(stream.events) == "Two."
    kinds = [e.type for e in stream.events]
    assert kinds.index("reasoning") < kinds.index("token")
    session = await get_session(client, created["id"])
    assert (session["text"], session["reasoning"]) == ("Two.", "First, add.")


async def test_anthropic_thinking_blocks_become_reasoning_and_resume_by_id(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    pieces = [
        ANTHROPIC_START,
        an("content_block_start", index=0, content_block={"type": "thinking", "thinking": "", "signature": ""}),
        an("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Weigh it."}),
        an("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "EqQBCgIYAhIM"}),
        an("content_block_stop", index=0),
        an("content_block_start", index=1, content_block={"type": "redacted_thinking", "data": "EmwKAhgB"}),
        an("content_block_stop", index=1),
        an("content_block_start", index=2, content_block={"type": "text", "text": ""}),
        an("content_block_delta", index=2, delta={"type": "text_delta", "text": "Heavy."}),
        an("content_block_stop", index=2),
        an("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 9}),
        an("message_stop"),
    ]
    client, created, stream = await run("anthropic", upstream, monkeypatch, serve, Reply(pieces, pause=0.05))
    assert [e.type for e in stream.events] == ["reasoning", "token", "done"]
    assert text_of(stream.events, "reasoning") == "Weigh it." and text_of(stream.events) == "Heavy."
    resumed = await read_stream(client, created["id"], last_event_id=stream.events[0].id)
    assert [e.type for e in resumed.events] == ["token", "done"]
    from_start = await read_stream(client, created["id"])
    assert [e.data for e in from_start.events] == [e.data for e in stream.events]


async def test_reasoning_hide_stores_none_of_it(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any
) -> None:
    client, created, stream = await run(
        "openai", upstream, monkeypatch, serve, Reply(REASONING_SHAPES["deepseek"]), reasoning="hide"
    )
    assert [e.type for e in stream.events] == ["token", "done"]
    session = await get_session(client, created["id"])
    assert (session["text"], session["reasoning"]) == ("Two.", "")
