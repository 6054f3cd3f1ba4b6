"""The relay's path from an append to a reader: entries reach readers without a stream read.

A reader in the producer's process gets each entry from the append's own reply; a reader in another
process gets it in the entry's notice. Either reads the stream only to catch up (its backlog, and once
after it registered). Counted on the real redis-server (`INFO commandstats`), with the text checked
against what the model said, so a path that skips or repeats an entry fails too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from chatbot.app import create_app
from chatbot.providers import Finish
from chatbot.settings import Settings
from tests.conftest import close_promptly, make_settings
from tests.helpers import assert_well_formed, create_session, read_stream, text_of
from tests.oracle import BurstyDemo, expected_text
from tests.sse import SSEParser

pytestmark = [pytest.mark.timeout(60)]

TOKENS = 120
READERS = 3
# Per reader: its backlog read and at most one read when it catches up (the hub's cursor starts there).
READS_PER_READER = 2


def _xrange_calls(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


def _provider() -> BurstyDemo:
    return BurstyDemo(tokens_per_second=200.0, answer_tokens=TOKENS, burst=1)


async def _app_client(settings: Settings) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings, provider=_provider())))
    await client.start_server()
    return client


async def _read_all(reader: TestClient[Any, Any], producer: TestClient[Any, Any], message: str) -> list[Any]:
    sid = (await create_session(producer, message))["id"]
    streams = await asyncio.gather(*(read_stream(reader, sid) for _ in range(READERS)))
    for stream in streams:
        assert stream.status == 200
        assert_well_formed(stream.events)
        assert stream.events[-1].type == "done"
        assert text_of(stream.events) == expected_text(message, TOKENS)
    return [s.events for s in streams]


async def test_readers_in_the_producers_process_read_only_their_backlog(redis_url: str) -> None:
    client = await _app_client(make_settings("redis", redis_url))
    try:
        before = _xrange_calls(redis_url)
        await _read_all(client, client, "local readers")
        reads = _xrange_calls(redis_url) - before
    finally:
        await close_promptly(client)
    # The answer has over a hundred entries; before entries came with their appends, each batch was read.
    assert reads <= READERS * READS_PER_READER, f"{reads} stream reads for {READERS} readers"


async def test_readers_in_another_process_get_entries_from_their_notices(redis_url: str) -> None:
    producer = await _app_client(make_settings("redis", redis_url))
    reader = await _app_client(make_settings("redis", redis_url))
    try:
        before = _xrange_calls(redis_url)
        await _read_all(reader, producer, "remote readers")
        reads = _xrange_calls(redis_url) - before
    finally:
        await close_promptly(reader)
        await close_promptly(producer)
    assert reads <= READERS * READS_PER_READER, f"{reads} stream reads for {READERS} readers"


class _Bulky:
    """An answer far larger than the sockets' buffers, as fast as it can go: a reader that pauses makes the
    server's socket full, so its entries must wait in the queue instead of being written straight away."""

    name = "bulky"
    PIECES = 600
    PIECE = 65_536

    def text(self) -> str:
        return "".join(self._piece(i) for i in range(self.PIECES))

    def _piece(self, i: int) -> str:
        return f"{i:05d}" + "x" * (self.PIECE - 6) + " "

    async def stream(self, messages: Any) -> Any:
        for i in range(self.PIECES):
            yield self._piece(i)
            if i % 20 == 0:
                await asyncio.sleep(0)
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


async def test_a_reader_that_stops_reading_then_goes_on_gets_every_byte_once(redis_url: str) -> None:
    bulky = _Bulky()
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(make_settings("redis", redis_url), provider=bulky)))
    await client.start_server()
    try:
        sid = (await create_session(client, "a long one"))["id"]
        prompt = asyncio.create_task(read_stream(client, sid))  # keeps up
        async with client.get(f"/events/{sid}") as resp:
            parser = SSEParser()
            seen = parser.feed(await resp.content.readany())
            await asyncio.sleep(2.0)  # stops reading: its socket and the server's fill up
            while not (seen and seen[-1].type in ("done", "error")):
                chunk = await resp.content.readany()
                assert chunk, "the stream ended without its terminal event"
                seen += parser.feed(chunk)
        assert_well_formed(seen)
        assert seen[-1].type == "done"
        assert text_of(seen) == bulky.text()
        fast = await prompt
        assert text_of(fast.events) == bulky.text()
    finally:
        await close_promptly(client)
