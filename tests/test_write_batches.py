"""Appends in batches at most one per `CHATBOT_WRITE_BATCH_INTERVAL_MS`, with an answer's first output at once.

Under load the batcher waits out the interval between two batches, so that more sessions' text shares a
round trip (bench/RESULTS.md); what waits joins its session's next entry. Seen by a reader over HTTP on a
real redis-server: an answer's text arrives whole, in fewer, larger events, and the first token of a new
answer is not held back by the wait.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatbot.app import create_app
from chatbot.providers import Provider
from tests.conftest import close_promptly, make_settings
from tests.helpers import assert_well_formed, create_session, read_stream, text_of
from tests.oracle import BurstyDemo, expected_text
from tests.sse import SSEParser

pytestmark = [pytest.mark.timeout(60)]


async def _client(redis_url: str, provider: Provider, interval_ms: float) -> TestClient[Any, Any]:
    settings = make_settings("redis", redis_url, write_batch_interval_ms=interval_ms)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings, provider=provider)))
    await client.start_server()
    return client


@pytest.mark.parametrize("interval_ms", [0.0, 200.0])
async def test_text_that_waits_for_the_next_batch_joins_one_entry(redis_url: str, interval_ms: float) -> None:
    tokens, per_second = 60, 100.0  # 0.6 s of answer
    client = await _client(
        redis_url, BurstyDemo(tokens_per_second=per_second, answer_tokens=tokens, burst=1), interval_ms
    )
    try:
        started = time.monotonic()
        sid = (await create_session(client, "in batches"))["id"]
        stream = await read_stream(client, sid)
        took = time.monotonic() - started  # 0.6 s, or more on a busy machine: more intervals, more entries
    finally:
        await close_promptly(client)
    assert_well_formed(stream.events)
    assert stream.events[-1].type == "done"
    assert text_of(stream.events) == expected_text("in batches", tokens)
    token_events = [e for e in stream.events if e.type == "token"]
    if interval_ms:
        # The first token at once, then one entry per interval at most (and one for a last partial interval).
        bound = 1 + math.ceil(took / (interval_ms / 1000)) + 1
        assert len(token_events) <= bound, f"{len(token_events)} token events, at most {bound} expected"
        assert json.loads(token_events[0].data)["text"] == expected_text("in batches", 1)
    else:
        # No interval: an idle service writes each token as it comes (the deltas are 10 ms apart).
        assert len(token_events) >= tokens // 2


async def test_a_new_answers_first_token_does_not_wait_for_the_interval(redis_url: str) -> None:
    interval = 1.0  # seconds; long, so that a first token held by it would be plain to see
    steady = BurstyDemo(tokens_per_second=50.0, answer_tokens=150, burst=1)  # 3 s, keeps batches going
    client = await _client(redis_url, steady, interval * 1000)
    try:
        busy = (await create_session(client, "keeps the batcher busy"))["id"]
        async with client.get(f"/events/{busy}") as resp:
            parser = SSEParser()
            tokens_seen = 0
            while tokens_seen < 2:  # a later batch just landed: the next one waits a whole interval
                tokens_seen += sum(e.type == "token" for e in parser.feed(await resp.content.readany()))
            started = time.monotonic()
            sid = (await create_session(client, "a new answer"))["id"]
            async with client.get(f"/events/{sid}") as new:
                new_parser = SSEParser()
                first_token = None
                while first_token is None:
                    chunk = await new.content.readany()
                    assert chunk, "the new answer's stream ended before a token"
                    first_token = next((e for e in new_parser.feed(chunk) if e.type == "token"), None)
                waited = time.monotonic() - started
    finally:
        await close_promptly(client)
    # The demo's first delta comes 20 ms after the request; a token held to the next batch would take ~1 s.
    assert waited < interval / 2, f"the first token took {waited:.3f} s with a {interval} s batch interval"
    assert json.loads(first_token.data)["text"] == expected_text("a new answer", 1)


async def test_a_first_token_after_a_quiet_spell_shorter_than_the_interval_does_not_wait(redis_url: str) -> None:
    interval = 1.0  # seconds
    client = await _client(redis_url, BurstyDemo(tokens_per_second=50.0, answer_tokens=1, burst=1), interval * 1000)
    try:
        # One answer's only token was the last batch; the batcher then has nothing queued, inside the interval.
        before = await read_stream(client, (await create_session(client, "just before"))["id"])
        assert before.events[-1].type == "done"
        started = time.monotonic()
        after = await read_stream(client, (await create_session(client, "just after"))["id"])
        waited = time.monotonic() - started
    finally:
        await close_promptly(client)
    assert text_of(after.events) == expected_text("just after", 1)
    # The demo's delta comes 20 ms after the request; held to the interval's end it would take most of 1 s.
    assert waited < interval / 2, f"the answer took {waited:.3f} s with a {interval} s batch interval"


async def test_many_answers_at_once_arrive_whole_with_an_interval(redis_url: str) -> None:
    answers, tokens = 30, 80
    provider = BurstyDemo(tokens_per_second=400.0, answer_tokens=tokens, burst=1)
    client = await _client(redis_url, provider, 5.0)
    try:
        messages = [f"answer {i}" for i in range(answers)]
        sids = [(await create_session(client, m))["id"] for m in messages]
        streams = await asyncio.gather(*(read_stream(client, sid) for sid in sids))
    finally:
        await close_promptly(client)
    for message, stream in zip(messages, streams, strict=True):
        assert_well_formed(stream.events)
        assert stream.events[-1].type == "done", message
        assert text_of(stream.events) == expected_text(message, tokens), message
