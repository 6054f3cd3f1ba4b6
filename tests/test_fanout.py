"""Many readers of one live session, joining at different points at once: each gets exactly its rest."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.helpers import assert_well_formed, create_session, get_session, read_stream, text_of, wait_terminal
from tests.oracle import BurstyDemo, expected_text
from tests.sse import SSEParser

pytestmark = [pytest.mark.timeout(60)]

READERS = 24
TOKENS = 150


@pytest.fixture
def provider() -> BurstyDemo:
    return BurstyDemo(tokens_per_second=150.0, answer_tokens=TOKENS, burst=3)


async def test_concurrent_joins_at_different_points_see_no_gap(client: TestClient[Any, Any]) -> None:
    created = await create_session(client, "fan out")
    sid = created["id"]
    # Watch the first part live so that readers can resume from ids that exist.
    seen: list[str] = []
    async with client.get(f"/events/{sid}") as resp:
        parser = SSEParser()
        while len(seen) < 20:
            for event in parser.feed(await resp.content.readany()):
                assert event.id is not None
                seen.append(event.id)
    rng = random.Random(7)

    async def join(i: int) -> tuple[str | None, list[Any]]:
        await asyncio.sleep(rng.random() * 0.3)  # joins spread over the live part of the answer
        start = None if i % 4 == 0 else rng.choice(seen)
        stream = await read_stream(client, sid, last_event_id=start, by="header" if i % 2 else "query")
        assert stream.status == 200
        return start, stream.events

    results = await asyncio.gather(*(join(i) for i in range(READERS)))
    full = (await wait_terminal(client, sid)).events
    assert text_of(full) == expected_text("fan out", TOKENS)  # what the model said, not the store's copy
    ids = [e.id for e in full]
    for start, events in results:
        assert_well_formed(events)
        expected = full if start is None else full[ids.index(start) + 1 :]
        assert [(e.id, e.data) for e in events] == [(e.id, e.data) for e in expected]
    assert (await get_session(client, sid))["text"] == text_of(full)
