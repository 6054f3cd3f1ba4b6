"""Several `python -m chatbot serve` processes on one real redis-server: cross-instance reads, cancel,
producer death, and the number of Redis connections one process holds for many open streams.

Text is checked against the demo's deterministic answer; Redis holds appends back for a moment
(CLIENT PAUSE WRITE) so that the producer coalesces deltas, as it does under load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import RedisServer, free_port, serve_env
from tests.deploy import Instance
from tests.helpers import (
    assert_problem,
    assert_well_formed,
    media_type,
    text_of,
)
from tests.oracle import expected_text, pause_writes
from tests.sse import Event, SSEParser

pytestmark = pytest.mark.timeout(60)

SLOW_ENV = {
    "CHATBOT_DEMO_TOKENS_PER_SECOND": "5",
    "CHATBOT_DEMO_ANSWER_TOKENS": "200",
    "CHATBOT_HEARTBEAT_SECONDS": "1",
}


class Cluster:
    def __init__(self, redis_url: str, tmp: Path, http: aiohttp.ClientSession) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.http = http
        self.instances: list[Instance] = []

    async def start(self, **env: str) -> Instance:
        port = free_port()
        instance = Instance(port, self.tmp / f"serve-{port}.log", serve_env(port, self.redis_url, **env))
        instance.start()
        self.instances.append(instance)
        await instance.wait_ready(self.http)
        return instance

    def stop_all(self) -> None:
        for instance in self.instances:
            instance.stop()


@pytest.fixture
def http_limits() -> int:
    return 100


@pytest_asyncio.fixture
async def http(http_limits: int) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=http_limits)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@pytest_asyncio.fixture
async def cluster(redis_url: str, tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url, tmp_path, http)
    try:
        yield c
    finally:
        c.stop_all()


async def post_session(http: aiohttp.ClientSession, instance: Instance, message: str = "hi") -> dict[str, Any]:
    async with http.post(instance.url + "/sessions", json={"message": message}) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
        return created


async def get_state(http: aiohttp.ClientSession, instance: Instance, session_id: str) -> dict[str, Any]:
    async with http.get(f"{instance.url}/sessions/{session_id}") as resp:
        assert resp.status == 200, await resp.text()
        state: dict[str, Any] = await resp.json()
        return state


async def read_until(
    http: aiohttp.ClientSession, instance: Instance, session_id: str, *, tokens: int | None = None
) -> list[Event]:
    """Read from the start until `tokens` token events arrived, or (tokens=None) to the stream's end."""
    events: list[Event] = []
    async with http.get(f"{instance.url}/events/{session_id}") as resp:
        assert resp.status == 200
        assert media_type(resp.headers.get("Content-Type")) == "text/event-stream"
        parser = SSEParser()
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                return events
            events += parser.feed(chunk)
            if tokens is not None and sum(e.type == "token" for e in events) >= tokens:
                return events


def stream_keys(server_url: str, session_id: str) -> list[str]:
    import redis

    with redis.Redis.from_url(server_url, decode_responses=True) as r:
        return [k for k in r.scan_iter(match=f"*{session_id}*", count=1000) if r.type(k) == "stream"]


async def test_post_on_one_read_on_other(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    a = await cluster.start(CHATBOT_DEMO_TOKENS_PER_SECOND="200", CHATBOT_DEMO_ANSWER_TOKENS="40")
    b = await cluster.start(CHATBOT_DEMO_TOKENS_PER_SECOND="200", CHATBOT_DEMO_ANSWER_TOKENS="40")
    created = await post_session(http, a, "across instances")
    await pause_writes(cluster.redis_url, 0.1)  # about 20 deltas wait behind one append
    on_b = await read_until(http, b, created["id"])
    assert_well_formed(on_b)
    assert on_b[-1].type == "done"
    assert text_of(on_b) == expected_text("across instances", 40)
    assert sum(e.type == "token" for e in on_b) < 40, "no delta was coalesced: the pause did not bite"
    on_a = await read_until(http, a, created["id"])
    assert [(e.id, e.data) for e in on_a] == [(e.id, e.data) for e in on_b]
    assert (await get_state(http, b, created["id"]))["text"] == text_of(on_b)
    # resume on the other instance too
    mid = on_b[len(on_b) // 2].id
    async with http.get(f"{a.url}/events/{created['id']}", headers={"Last-Event-ID": mid or ""}) as resp:
        parser = SSEParser()
        rest = parser.feed(await resp.read())
    assert [(e.id, e.data) for e in rest] == [(e.id, e.data) for e in on_b[len(on_b) // 2 + 1 :]]


async def test_sigkill_producer_gives_readers_retryable_error(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    a = await cluster.start(**SLOW_ENV)
    b = await cluster.start(**SLOW_ENV)
    created = await post_session(http, a, "killed mid answer")
    session_id = created["id"]
    await pause_writes(cluster.redis_url, 1.2)  # about five deltas wait behind one append
    events: list[Event] = []
    killed_at: list[float] = []
    async with http.get(f"{b.url}/events/{session_id}") as resp:
        assert resp.status == 200
        parser = SSEParser()
        while True:
            chunk = await resp.content.readany()
            assert chunk, "stream on B ended without a terminal event"
            events += parser.feed(chunk)
            if not killed_at and sum(e.type == "token" for e in events) >= 3:
                os.kill(a.process.pid, signal.SIGKILL)
                a.process.wait(timeout=5)
                killed_at.append(time.monotonic())
            if events and events[-1].type in {"done", "error"}:
                elapsed = time.monotonic() - killed_at[0]
                break
            if killed_at:
                assert time.monotonic() - killed_at[0] < 10.5, "no terminal event within 10 s of the kill"
        # after the terminal event the server ends the response
        assert await resp.content.read() == b""
    assert_well_formed(events)
    terminal = events[-1]
    assert terminal.type == "error", terminal
    payload = terminal.json()
    assert payload["retryable"] is True
    assert elapsed < 10, f"terminal error came {elapsed:.1f} s after the kill"
    tokens = sum(e.type == "token" for e in events)
    assert tokens < 200, "the answer finished before the kill took effect"
    assert expected_text("killed mid answer", 200).startswith(text_of(events)), "a gap in the text before the kill"
    state = await get_state(http, b, session_id)
    assert state["status"] == "failed"
    assert state["text"] == text_of(events)
    replay = await read_until(http, b, session_id)
    assert [(e.id, e.type, e.data) for e in replay] == [(e.id, e.type, e.data) for e in events]


async def test_cancel_on_other_instance_stops_the_producer(
    cluster: Cluster, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a = await cluster.start(**SLOW_ENV)
    b = await cluster.start(**SLOW_ENV)
    created = await post_session(http, a, "stop this")
    session_id = created["id"]
    await pause_writes(cluster.redis_url, 1.2)  # about five deltas wait behind one append
    reader = asyncio.create_task(read_until(http, a, session_id))
    await read_until(http, b, session_id, tokens=3)  # past the entry that joined the held-back deltas
    async with http.post(f"{b.url}/sessions/{session_id}/cancel") as resp:
        assert resp.status == 202
    async with asyncio.timeout(5):
        events = await reader
    assert_well_formed(events)
    assert events[-1].type == "done"
    assert events[-1].json()["finish_reason"] == "cancelled"
    assert expected_text("stop this", 200).startswith(text_of(events)), "a gap in the text before the cancel"
    for instance in (a, b):
        state = await get_state(http, instance, session_id)
        assert state["status"] == "cancelled"
        assert state["text"] == text_of(events)
    # the producer on A really stopped: its Redis stream does not grow any more
    keys = stream_keys(redis_url, session_id)
    assert keys, "no Redis stream key carries the session id"
    import redis

    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        lengths = {k: r.xlen(k) for k in keys}
        last = {k: r.xrevrange(k, count=1)[0][0] for k in keys}
        await asyncio.sleep(1.5)  # several token intervals at 5 tokens/s: growth would show
        assert {k: r.xlen(k) for k in keys} == lengths
    assert events[-1].id in set(last.values())
    assert a.process.poll() is None, "the producing instance died"
    async with http.get(a.url + "/healthz") as resp:
        assert resp.status == 200


async def test_unknown_ids_are_404_on_every_instance(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    a = await cluster.start()
    async with http.get(a.url + "/events/AAAAAAAAAAAAAAAAAAAAAA") as resp:
        await assert_problem(resp, 404)
    async with http.post(a.url + "/sessions/AAAAAAAAAAAAAAAAAAAAAA/cancel") as resp:
        await assert_problem(resp, 404)


@pytest.fixture
def lone_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.timeout(90)
@pytest.mark.parametrize("http_limits", [0])
async def test_300_streams_use_a_handful_of_redis_connections(
    lone_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = Cluster(lone_redis.url, tmp_path, http)
    try:
        a = await cluster.start(CHATBOT_DEMO_TOKENS_PER_SECOND="2", CHATBOT_DEMO_ANSWER_TOKENS="200")
        sessions = await asyncio.gather(*(post_session(http, a, f"q{i}") for i in range(100)))
        opened = 0
        all_open = asyncio.Event()

        async def hold(session_id: str) -> None:
            nonlocal opened
            async with http.get(f"{a.url}/events/{session_id}") as resp:
                assert resp.status == 200
                parser = SSEParser()
                counted = False
                while True:
                    chunk = await resp.content.readany()
                    assert chunk, "a stream ended early"
                    if not counted and any(e.type == "token" for e in parser.feed(chunk)):
                        counted = True
                        opened += 1
                        if opened == 300:
                            all_open.set()

        tasks = [asyncio.create_task(hold(s["id"])) for s in sessions for _ in range(3)]
        try:
            async with asyncio.timeout(30):
                waiter = asyncio.create_task(all_open.wait())
                done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not waiter:
                        t.result()  # surface the failure of a reader
            samples = []
            with lone_redis.client() as r:
                me = r.client_id()
                for _ in range(5):
                    clients = [c for c in r.client_list() if int(c["id"]) != me]
                    samples.append(len(clients))
                    await asyncio.sleep(0.2)  # sampling over time, not synchronisation
            assert not any(t.done() for t in tasks), "streams closed while counting"
            assert max(samples) <= 10, f"Redis connections while 300 streams are open: {samples}"
            assert min(samples) >= 1, "the instance holds no Redis connection at all?"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with http.get(a.url + "/healthz") as resp:
            assert resp.status == 200
    finally:
        cluster.stop_all()


@pytest.mark.parametrize("with_traffic", [False, True])
async def test_sigterm_stops_the_process_promptly(
    cluster: Cluster, http: aiohttp.ClientSession, with_traffic: bool
) -> None:
    """A deployment's SIGTERM ends the process cleanly; a hang here means kill -9 and lost answers."""
    a = await cluster.start(CHATBOT_DEMO_TOKENS_PER_SECOND="200", CHATBOT_DEMO_ANSWER_TOKENS="40")
    if with_traffic:
        created = await post_session(http, a)
        events = await read_until(http, a, created["id"])
        assert events[-1].type == "done"
    a.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while a.process.poll() is None:
        assert time.monotonic() < deadline, f"still running 10 s after SIGTERM:\n{a.tail()}"
        await asyncio.sleep(0.1)  # waiting for a process exit: no event to await
    assert a.process.returncode == 0, a.tail()
