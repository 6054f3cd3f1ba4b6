"""Many new sessions at once: started a few at a time, first come first served, and never stuck.

The provider here costs CPU to start, as the SDKs do (building the request is the bulk of an answer's start:
bench/RESULTS.md), and records when each answer began. The rest is the real app on a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from redis import asyncio as aioredis

from chatbot.app import create_app
from chatbot.providers import Finish, Message, ProviderError
from tests.conftest import make_settings
from tests.helpers import assert_problem, create_session, text_of, wait_terminal

pytestmark = pytest.mark.timeout(60)

Client = TestClient[Any, Any]


def words_for(message: str) -> list[str]:
    return [f"{message}:{i} " for i in range(5)]


class CostlyStart:
    """Spends `build` seconds of CPU before its request is on its way (its first wait), then streams
    `words_for(message)`. The message `fail at once` fails before any wait; `hang` waits forever once
    started (until cancelled)."""

    name = "costly-start"

    def __init__(self, build: float) -> None:
        self.build = build
        self.started: list[str] = []

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        message = messages[-1].content
        self.started.append(message)
        if message == "fail at once":
            raise ProviderError("upstream_error", "refused before it began", retryable=True)
        until = time.perf_counter() + self.build
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)
        if message == "hang":
            await asyncio.Event().wait()
        for word in words_for(message):
            yield word
            await asyncio.sleep(0.001)
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


def service(redis_url: str, provider: CostlyStart, **overrides: Any) -> Client:
    """The real app on the test's Redis with `provider`; used as `async with`."""
    settings = make_settings("redis", redis_url, rate_limit=0, **overrides)
    return TestClient(TestServer(create_app(settings, provider=provider)))


async def test_a_burst_of_new_sessions_is_started_first_come_first_served(redis_url: str) -> None:
    """Sixteen visitors at once, two starts at a time: the first are answered while most answers have not
    begun (all at once, every start would run before any POST was answered), and every answer is whole."""
    provider = CostlyStart(build=0.01)
    async with service(redis_url, provider, starts_at_once=2) as client:
        begun_when_answered: list[int] = []

        async def visitor(i: int) -> dict[str, Any]:
            resp = await client.post("/sessions", json={"message": f"visitor {i}"})
            begun_when_answered.append(len(provider.started))
            assert resp.status == 201, await resp.text()
            created: dict[str, Any] = await resp.json()
            return created

        created = await asyncio.gather(*(visitor(i) for i in range(16)))
        assert sorted(provider.started) == sorted(f"visitor {i}" for i in range(16))
        assert min(begun_when_answered) <= 8, begun_when_answered
        for i, session in enumerate(created):
            stream = await wait_terminal(client, session["id"])
            assert text_of(stream.events) == "".join(words_for(f"visitor {i}"))
            assert json.loads(stream.events[-1].data)["finish_reason"] == "stop"


async def test_a_start_slot_is_given_back_however_the_start_ends(redis_url: str) -> None:
    """One start at a time: after an answer that failed before its request went, one cancelled while it
    waited, and a burst the store refused, a new visitor's answer still starts (a slot kept by any of them
    would leave every later POST waiting)."""
    provider = CostlyStart(build=0.0)
    async with service(redis_url, provider, starts_at_once=1) as client:
        failed = await create_session(client, "fail at once")
        stream = await asyncio.wait_for(wait_terminal(client, failed["id"]), 5)
        assert stream.events[-1].type == "error"

        hanging = await asyncio.wait_for(create_session(client, "hang"), 5)
        resp = await client.post(f"/sessions/{hanging['id']}/cancel")
        assert resp.status in (200, 202), await resp.text()
        stream = await asyncio.wait_for(wait_terminal(client, hanging["id"]), 5)
        assert json.loads(stream.events[-1].data)["finish_reason"] == "cancelled"

        admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await admin.replicaof("127.0.0.1", 1)  # nobody there: a read-only replica refuses every write
            await admin.client_pause(200, all=False)  # so that all three wait for the one slot
            refused = await asyncio.wait_for(
                asyncio.gather(*(client.post("/sessions", json={"message": f"refused {i}"}) for i in range(3))), 10
            )
            for resp in refused:
                await assert_problem(resp, 503)
        finally:
            await admin.replicaof("NO", "ONE")
            await admin.aclose()

        for message in ("after all that", "and one more"):
            created = await asyncio.wait_for(create_session(client, message), 5)
            stream = await asyncio.wait_for(wait_terminal(client, created["id"]), 5)
            assert text_of(stream.events) == "".join(words_for(message))


class SeesTheStore(CostlyStart):
    """Records, when its request would be on its way (before its first wait), whether its session is in Redis."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(build=0.0)
        self.redis = redis.Redis.from_url(redis_url)
        self.stored_when_sent: list[bool] = []

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        # A blocking read from inside the loop: nothing of the app's can run until it has its answer.
        self.stored_when_sent.append(bool(self.redis.keys("chatbot:*:meta")))
        async for item in super().stream(messages):
            yield item


async def test_a_lone_visitors_upstream_request_goes_before_the_session_is_stored(redis_url: str) -> None:
    """With a start slot free, the provider's request goes first and the session is stored while the
    upstream answers (time to first token, bench/RESULTS.md): when the request leaves, the store has not
    been asked yet. Its answer is whole all the same, and a store that refuses the session still gets a 503
    (`tests/test_providers_upstream.py`)."""
    provider = SeesTheStore(redis_url)
    try:
        async with service(redis_url, provider) as client:
            for i in range(3):
                with provider.redis.pipeline() as pipe:
                    for key in provider.redis.scan_iter("chatbot:*"):
                        pipe.delete(key)
                    pipe.execute()
                session = await create_session(client, f"lone {i}")
                stream = await wait_terminal(client, session["id"])
                assert text_of(stream.events) == "".join(words_for(f"lone {i}"))
            assert provider.stored_when_sent == [False, False, False]
    finally:
        provider.redis.close()
