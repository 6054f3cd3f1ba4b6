"""Writes whose reply is lost are sent again, and a repeat must change nothing a visitor sees.

Redis can run a command and lose its reply: it was killed after its append-only file had the write, or the
connection dropped on the way back. The client (redis-py's retry, then the producer's) sends the command again.
CI once caught an answer reading "Try Try the simplest approach" in every client after Redis was killed
mid-answer (tests/browser/test_clients.py::test_every_client_reads_whole_answers_across_a_redis_outage): the
token append had landed, its reply was lost, and the retry appended it a second time.

Here a proxy loses replies on purpose, on a real redis-server, for each kind of write the producer repeats:
a batch of token entries (one lost reply, which redis-py's own retry repeats, and a run of lost replies long
enough that the batcher takes the entry back and the producer retries it itself), the terminal entry, and
the conversation's history turn. Readers must see the model's text exactly once, in order, with one `done`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis
from aiohttp.test_utils import TestClient, TestServer

from chatbot import keys, store
from chatbot.app import create_app
from tests.conftest import RedisServer, close_promptly, make_settings
from tests.helpers import assert_well_formed, create_session, get_session, read_stream, text_of
from tests.oracle import BurstyDemo, expected_text
from tests.reply_dropper import ReplyDropper

pytestmark = [pytest.mark.timeout(60)]

TOKENS = 160


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


BATCH = _sha(store._APPEND_MANY)  # the batcher's token entries
SINGLE = _sha(store._APPEND)  # `sources` and the terminal entry
TURN = _sha(store._APPEND_TURN)  # the conversation's history


@pytest_asyncio.fixture
async def dropper(redis_url: str) -> AsyncIterator[ReplyDropper]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDropper(port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def _service(url: str, tokens_per_second: float = 200.0) -> TestClient[Any, Any]:
    provider = BurstyDemo(tokens_per_second=tokens_per_second, answer_tokens=TOKENS, burst=2)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(make_settings("redis", url), provider=provider)))
    await client.start_server()
    return client


async def _tokens_seen(client: TestClient[Any, Any], session_id: str, count: int) -> None:
    """Wait until the session's stream holds `count` token entries (read through the service)."""
    async with client.get(f"/events/{session_id}") as resp:
        seen = 0
        async for line in resp.content:
            if line.startswith(b"event: token"):
                seen += 1
                if seen >= count:
                    return


def _assert_whole_once(events: list[Any], message: str) -> None:
    assert_well_formed(events)
    assert [e.type for e in events].count("done") == 1
    assert events[-1].type == "done", events[-1]
    assert text_of(events) == expected_text(message, TOKENS)


async def test_token_entries_whose_reply_was_lost_are_not_appended_twice(dropper: ReplyDropper) -> None:
    client = await _service(dropper.url, tokens_per_second=80.0)
    try:
        message = "Lose a reply or two"
        sid = (await create_session(client, message))["id"]
        reader = asyncio.create_task(read_stream(client, sid))
        await asyncio.wait_for(_tokens_seen(client, sid, 5), 10)
        dropper.drop(BATCH)  # redis-py sends it again on a new connection
        await asyncio.wait_for(_tokens_seen(client, sid, 12), 10)
        dropper.drop(BATCH)
        await asyncio.wait_for(_tokens_seen(client, sid, 20), 10)
        # More than redis-py's own retries (3): the batcher gets the error and the writer sends the entry again,
        # while the provider goes on adding text behind it.
        dropper.drop(BATCH, 6)
        stream = await asyncio.wait_for(reader, 30)
        _assert_whole_once(stream.events, message)
        assert dropper.dropped[BATCH] == 8, "the proxy lost fewer replies than the test is about"
        # A visitor who comes later reads the stored stream: the same entries, the same ids.
        again = await read_stream(client, sid)
        assert [(e.id, e.data) for e in again.events] == [(e.id, e.data) for e in stream.events]
        state = await get_session(client, sid)
        assert (state["status"], state["text"]) == ("done", expected_text(message, TOKENS))
    finally:
        await close_promptly(client)


async def test_the_terminal_entry_and_the_history_turn_land_once(dropper: ReplyDropper, redis_url: str) -> None:
    client = await _service(dropper.url, tokens_per_second=2000.0)
    try:
        message = "Lose the last replies"
        dropper.drop(TURN, 2)
        dropper.drop(SINGLE, 2)
        created = await create_session(client, message)
        stream = await asyncio.wait_for(read_stream(client, created["id"]), 30)
        assert dropper.dropped == {TURN: 2, SINGLE: 2}
        _assert_whole_once(stream.events, message)
        assert stream.events[-1].json()["finish_reason"] == "stop"
        # A reader who resumes after the terminal entry gets nothing more, and no second `done`.
        after = await read_stream(client, created["id"], last_event_id=stream.events[-1].id)
        assert [e.type for e in after.events] == []
        # The conversation goes on with one earlier turn, not two copies of it.
        with redis.Redis.from_url(redis_url, decode_responses=True) as direct:
            assert direct.llen(keys.history(created["conversation_id"])) == 1
        follow_up = await create_session(client, "And then?", conversation_id=created["conversation_id"])
        second = await asyncio.wait_for(read_stream(client, follow_up["id"]), 30)
        assert second.events[-1].type == "done"
        with redis.Redis.from_url(redis_url, decode_responses=True) as direct:
            assert direct.llen(keys.history(created["conversation_id"])) == 2
    finally:
        await close_promptly(client)


async def _read_like_a_browser(client: TestClient[Any, Any], session_id: str) -> list[Any]:
    """Read to the terminal event, reconnecting with Last-Event-ID whenever the stream breaks off."""
    events: list[Any] = []
    while not events or events[-1].type not in ("done", "error"):
        last = events[-1].id if events else None
        try:
            stream = await read_stream(client, session_id, last_event_id=last)
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
            continue
        assert stream.status == 200, stream.raw_prefix
        events += stream.events
    return events


async def test_redis_killed_again_and_again_mid_answer_repeats_no_token() -> None:
    """The handed fault, over HTTP: Redis (append-only, fsync always) killed several times mid-answer.

    A kill lands between the append-only write and the reply only sometimes; the proxy tests above make that
    certain. This one checks that the whole path (pool reconnects, retries, the hub's resubscription, a
    reader's resume) adds no repeat of its own either.
    """
    with RedisServer(appendonly=True) as server:
        client = await _service(server.url, tokens_per_second=120.0)
        try:
            message = "Keep going while Redis is away"
            sid = (await create_session(client, message))["id"]
            reader = asyncio.create_task(_read_like_a_browser(client, sid))
            for _ in range(4):
                await asyncio.sleep(0.25)
                server.stop()
                await asyncio.sleep(0.3)
                await asyncio.to_thread(server.start)
            events = await asyncio.wait_for(reader, 40)
        finally:
            await close_promptly(client)
    _assert_whole_once(events, message)


async def test_a_restart_that_drops_the_last_writes_ends_the_answer_instead_of_leaving_a_gap() -> None:
    """Redis comes back from an older snapshot: the stream lacks entries that readers already have.

    Appending on would give those readers a gap (they hold ids the stream no longer has, and the text after
    them would skip what was lost); the producer's next append sees the stream does not end where it left it,
    so the answer ends with a retryable `store_data_lost` error placed after every id a reader may hold.
    """
    with RedisServer() as server:  # no append-only file: a restart loads the last snapshot
        client = await _service(server.url, tokens_per_second=60.0)
        try:
            message = "Forget the last few tokens"
            sid = (await create_session(client, message))["id"]
            reader = asyncio.create_task(_read_like_a_browser(client, sid))
            await asyncio.wait_for(_tokens_seen(client, sid, 10), 10)
            with redis.Redis.from_url(server.url) as direct:
                direct.save()  # the snapshot the restart goes back to
            await asyncio.wait_for(_tokens_seen(client, sid, 25), 10)
            server.stop()
            await asyncio.to_thread(server.start)
            events = await asyncio.wait_for(reader, 40)
        finally:
            await close_promptly(client)
    assert_well_formed(events)
    assert events[-1].type == "error", events[-1]
    assert events[-1].json()["code"] == "store_data_lost"
    assert events[-1].json()["retryable"] is True
    # What the reader got before the error is the model's text, whole up to where it stopped.
    assert expected_text(message, TOKENS).startswith(text_of(events))
    assert len([e for e in events if e.type == "token"]) >= 25
