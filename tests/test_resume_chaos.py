"""Many readers drop at random byte offsets and resume by Last-Event-ID: no gap, no duplicate, ever.

What each reader pieced together is compared with what the model said (the demo's deterministic answer),
not only with a second read of the store.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from chatbot import keys
from tests.conftest import RedisServer
from tests.helpers import (
    TERMINAL,
    assert_well_formed,
    create_session,
    get_session,
    read_stream,
    text_of,
)
from tests.oracle import BurstyDemo, expected_text
from tests.sse import Event, SSEParser

SESSIONS = 30
MAX_DROPS = 8
TOKENS = 60

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def provider() -> BurstyDemo:
    # Bursts make the writer coalesce deltas into one entry, as it does under load.
    return BurstyDemo(tokens_per_second=100.0, answer_tokens=TOKENS, burst=4)


@dataclass
class Reader:
    session_id: str
    rng: random.Random
    events: list[Event] = field(default_factory=list)
    drops: int = 0
    live_drops: int = 0
    resumed_with_tokens: int = 0
    saw_204: bool = False
    by_query: int = 0
    by_header: int = 0


async def chaotic_read(client: TestClient[Any, Any], reader: Reader) -> None:
    rng = reader.rng
    while True:
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        resuming = bool(reader.events)
        if resuming:
            last = reader.events[-1].id
            assert last is not None
            if rng.random() < 0.5:
                headers["Last-Event-ID"] = last
                reader.by_header += 1
            else:
                params["last_event_id"] = last
                reader.by_query += 1
        before = len(reader.events)
        async with client.get(f"/events/{reader.session_id}", headers=headers, params=params) as resp:
            if resp.status == 204:
                assert reader.events and reader.events[-1].type in TERMINAL, "204 before the terminal event"
                reader.saw_204 = True
                return
            assert resp.status == 200, await resp.text()
            parser = SSEParser()
            budget = rng.randint(1, 400) if reader.drops < MAX_DROPS else None
            received = 0
            while True:
                want = rng.randint(1, 64)
                if budget is not None:
                    want = min(want, budget - received)
                chunk = await resp.content.read(want)
                if not chunk:
                    # the server ended the response: only right after the terminal event
                    assert reader.events and reader.events[-1].type in TERMINAL, "stream ended without terminal"
                    return
                received += len(chunk)
                reader.events += parser.feed(chunk)
                if budget is not None and received >= budget:
                    break
            if resuming and any(e.type == "token" for e in reader.events[before:]):
                reader.resumed_with_tokens += 1
            # drop the connection abruptly, maybe in the middle of an event or a UTF-8 character
            resp.close()
        reader.drops += 1
        if reader.events and reader.events[-1].type in TERMINAL:
            continue  # the next request must answer 204
        state = await get_session(client, reader.session_id)
        if state["status"] in {"queued", "streaming"}:
            reader.live_drops += 1


async def test_random_drops_and_resumes_lose_and_repeat_nothing(
    client: TestClient[Any, Any], store: str, request: pytest.FixtureRequest
) -> None:
    seed = random.randrange(1 << 30)
    messages = [f"question {i}" for i in range(SESSIONS)]
    created = await asyncio.gather(*(create_session(client, m) for m in messages))
    readers = [Reader(c["id"], random.Random(seed + i)) for i, c in enumerate(created)]
    await asyncio.gather(*(chaotic_read(client, r) for r in readers))

    for reader, message in zip(readers, messages, strict=True):
        assert_well_formed(reader.events)
        assert text_of(reader.events) == expected_text(message, TOKENS), f"seed {seed}: {reader.session_id}"
        assert reader.events[-1].json()["finish_reason"] == "stop"
        full = await read_stream(client, reader.session_id)
        assert full.status == 200
        assert_well_formed(full.events)
        got = [(e.id, e.type, e.data) for e in reader.events]
        want = [(e.id, e.type, e.data) for e in full.events]
        assert got == want, f"seed {seed}: session {reader.session_id} differs after resumes"
        state = await get_session(client, reader.session_id)
        assert state["status"] == "done"
        assert state["text"] == text_of(reader.events)

    if store == "redis":
        # the events came from the real server's streams, entry for entry
        server: RedisServer = request.getfixturevalue("redis_server")
        with server.client() as direct:
            for reader in readers:
                stored = [entry_id for entry_id, _ in direct.xrange(keys.stream(reader.session_id))]
                assert stored == [e.id for e in reader.events], f"seed {seed}: {reader.session_id}"

    drops = sum(r.drops for r in readers)
    live = sum(r.live_drops for r in readers)
    fruitful = sum(r.resumed_with_tokens for r in readers)
    # the chaos really happened: many drops while answers were still being generated
    assert drops >= SESSIONS, f"seed {seed}: only {drops} drops"
    assert live >= SESSIONS // 2, f"seed {seed}: only {live} drops while live"
    assert fruitful >= SESSIONS // 2, f"seed {seed}: only {fruitful} resumes delivered tokens"
    assert sum(r.by_header for r in readers) and sum(r.by_query for r in readers)
