"""The hub's hand-over from backlog to live tail, in the exact interleaving that once lost events.

Two readers join a session that has none yet. The later one catches up first, so the hub's cursor
starts at its position; the earlier reader must not be handed events after a gap it never read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest_asyncio

from chatbot import events
from chatbot.hub import Hub
from chatbot.metrics import Metrics
from chatbot.settings import Settings
from chatbot.store import Store, open_redis


@pytest_asyncio.fixture
async def parts(redis_url: str) -> AsyncIterator[tuple[Store, Hub]]:
    settings = dataclasses.replace(Settings(), redis_url=redis_url)
    store = Store(open_redis(settings), settings, owner="test")
    hub = Hub(store, Metrics(), lease_ttl=settings.lease_ttl_seconds, on_cancel=lambda _: None)
    await hub.start()
    try:
        yield store, hub
    finally:
        await hub.close()
        await store.close()


async def append(store: Store, sid: str, text: str) -> str:
    result = await store.append(sid, events.TOKEN, events.token_data(text))
    assert result.id is not None
    return result.id


async def test_reader_behind_the_hub_cursor_is_told_to_reread(parts: tuple[Store, Hub]) -> None:
    store, hub = parts
    sid = "A" * 22
    await store.create_session(sid, "C" * 22, "hello")
    early = [await append(store, sid, f"t{i}") for i in range(3)]
    async with hub.subscribe(sid, (0, 0)) as first:
        backlog_first = await store.read_from(sid, "-")
        assert [e.id for e in backlog_first] == early
        missed = [await append(store, sid, f"u{i}") for i in range(4)]  # after the first reader's backlog
        async with hub.subscribe(sid, (0, 0)) as second:
            backlog_second = await store.read_from(sid, "-")
            second.last_id = events.parse_event_id(backlog_second[-1].id)
            hub.caught_up(second, backlog_second[-1].id)  # the later reader catches up first
            first.last_id = events.parse_event_id(early[-1])
            hub.caught_up(first, early[-1])
            written: list[bytes] = []

            def record(data: bytes, count: int) -> bool:
                written.append(data)
                return True

            first.direct = record  # as if its handler waited in next_batch
            live = [await append(store, sid, f"v{i}") for i in range(2)]
            got_second = await asyncio.wait_for(hub.next_batch(second), 5)
            while len(got_second) < len(live):
                got_second += await asyncio.wait_for(hub.next_batch(second), 5)
            assert [e.id for e, _ in got_second] == live
            # The hub read the live events after the second reader's position, past events the first
            # reader never received: it must be told to re-read, not be handed the live events.
            got_first = await asyncio.wait_for(hub.next_batch(first), 5)
            assert got_first == [], f"handed {[e.id for e, _ in got_first]} across a gap of {missed}"
            assert written == [], "live events written straight into the socket across the gap"
            reread = await store.read_from(sid, "(" + early[-1])
            assert [e.id for e in reread] == missed + live


async def test_direct_writes_and_queued_batches_together_keep_the_order(parts: tuple[Store, Hub]) -> None:
    """Live entries written straight into a reader's socket, or queued when it cannot take them at once
    (its buffer full: every third write refused here), reach the reader once each and in order."""
    store, hub = parts
    store.on_entry = hub.entry  # as the app wires it: this process's appends reach its hub directly
    sid = "D" * 22
    await store.create_session(sid, "C" * 22, "hello")
    got: list[str] = []
    refused = 0

    def direct(data: bytes, count: int) -> bool:
        nonlocal refused
        if (len(got) + refused) % 3 == 2:
            refused += 1
            return False
        ids = [line[4:].decode() for line in data.split(events.SEP) if line.startswith(b"id: ")]
        assert len(ids) == count
        got.extend(ids)
        return True

    async with hub.subscribe(sid, (0, 0)) as sub:
        hub.caught_up(sub, "0-0")

        async def handler() -> None:  # what sse._serve does around take()
            while True:
                sub.direct = direct
                try:
                    batch = await hub.next_batch(sub)
                finally:
                    sub.direct = None
                got.extend(event.id for event, _ in batch)
                if batch and batch[-1][0].terminal:
                    return

        reading = asyncio.create_task(handler())
        appended = []
        for i in range(60):
            appended.append(await append(store, sid, f"w{i} "))
            if i % 7 == 0:
                await asyncio.sleep(0.01)  # let some entries go one by one, others pile up
        end = await store.append(sid, events.DONE, events.done_data("stop"), terminal_status="done")
        await asyncio.wait_for(reading, 5)
    assert refused > 5
    assert got == [*appended, end.id]
