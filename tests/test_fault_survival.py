"""One session's fault never ends a shared task; a shared task that ends anyway stops the instance loudly.

Faults are injected into each process-wide task: the batcher, the lease keeper, the hub's pub/sub
listener, its fetch loop and its sweep. The faulty session ends with `internal_error` (its traceback
logged when it happens); every other session goes on; the next answer works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from chatbot import producer
from chatbot.app import create_app
from chatbot.appkeys import FAULTS, HUB, STORE
from chatbot.hub import Hub
from chatbot.providers import Finish, Message, Reasoning
from chatbot.settings import Settings
from tests.conftest import ROOT, free_port, make_settings
from tests.helpers import create_session, get_session, read_stream, text_of, wait_terminal

pytestmark = pytest.mark.timeout(40)
Client = TestClient[Any, Any]


class Script:
    """A model whose answer is the message's words, one delta each, `delay` apart; "wedge" never answers."""

    name = "script"

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.release = asyncio.Event()  # lets a wedged answer go at the end of the test

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
        words = messages[-1].content.split()
        if words == ["wedge"]:
            while not self.release.is_set():
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue  # a task that swallows its cancel: the wedge the sweep must catch
            return
        for word in words:
            await asyncio.sleep(self.delay)
            yield word + " "
        yield Finish("stop")

    async def aclose(self) -> None:
        self.release.set()


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    clients: list[Client] = []

    async def start(settings: Settings, provider: Script | None = None) -> Client:
        client: Client = TestClient(TestServer(create_app(settings, provider=provider or Script())))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    return make_settings("redis", redis_url, lease_ttl_seconds=0.6, **overrides)


def error_code(stream: Any) -> str:
    last = stream.events[-1]
    assert last.type == "error", (last.type, last.data)
    code: str = json.loads(last.data)["code"]
    return code


async def read_to_the_end(client: Client, session_id: str) -> Any:
    """Read, and reconnect with the last id as a browser does when the hub ends a stream without its end."""
    for _ in range(3):
        try:
            stream = await read_stream(client, session_id)
        except aiohttp.ClientError:
            continue  # the connection was cut: reconnect (from the start, so the test sees every event)
        assert stream.status == 200, stream.raw_prefix
        if stream.events and stream.events[-1].type in ("done", "error"):
            return stream
    raise AssertionError("no terminal event after three reconnects")


def logged_traceback(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.exc_info is not None and text in r.getMessage() for r in caplog.records)


async def test_batcher_survives_one_sessions_bad_entry(
    serve: Callable[..., Any], redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = producer._entry_data

    def poisoned(event: str, text: str) -> str:
        if "POISON" in text:
            raise ValueError("injected: this entry cannot be encoded")
        return real(event, text)

    monkeypatch.setattr(producer, "_entry_data", poisoned)
    client = await serve(settings_for(redis_url))
    healthy = await create_session(client, " ".join(["fine"] * 15))
    bad = await create_session(client, "some POISON here")
    bad_stream = await wait_terminal(client, bad["id"])
    assert error_code(bad_stream) == "internal_error"
    assert json.loads(bad_stream.events[-1].data)["retryable"] is True
    assert logged_traceback(caplog, "its entries cannot be stored")
    healthy_stream = await wait_terminal(client, healthy["id"])
    assert healthy_stream.events[-1].type == "done" and text_of(healthy_stream.events) == "fine " * 15
    after = await wait_terminal(client, (await create_session(client, "and after"))["id"])
    assert text_of(after.events) == "and after "
    assert client.app[FAULTS] == []


async def test_text_redis_cannot_encode_fails_only_its_own_answer(
    serve: Callable[..., Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate (valid JSON, `"\\ud800"`) breaks a pipeline of every session's appends."""

    class Surrogate(Script):
        async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
            if messages[-1].content == "surrogate":
                await asyncio.sleep(0.1)
                yield json.loads('"bad \\ud800 text"')
                yield Finish("stop")
                return
            async for item in super().stream(messages):
                yield item

    client = await serve(settings_for(redis_url), Surrogate(delay=0.02))
    healthy = await create_session(client, " ".join(["word"] * 15))
    bad = await create_session(client, "surrogate")
    assert error_code(await wait_terminal(client, bad["id"])) == "internal_error"
    assert logged_traceback(caplog, "its entries cannot be stored")
    assert text_of((await wait_terminal(client, healthy["id"])).events) == "word " * 15


async def test_lease_keeper_survives_a_failed_round(
    serve: Callable[..., Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(settings_for(redis_url), Script(delay=0.1))
    store = client.app[STORE]
    real = store.renew_leases
    failures = 2

    async def flaky(sids: Sequence[str]) -> dict[str, str]:
        nonlocal failures
        if failures:
            failures -= 1
            raise KeyError("injected")
        renewed: dict[str, str] = await real(sids)
        return renewed

    store.renew_leases = flaky
    created = await create_session(client, " ".join(["slow"] * 20))  # 2 s: three lease lifetimes
    stream = await wait_terminal(client, created["id"])
    assert stream.events[-1].type == "done", stream.events[-1].data
    assert failures == 0 and logged_traceback(caplog, "lease renewal")


async def test_hub_listener_survives_a_message_it_cannot_handle(
    serve: Callable[..., Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Notices are for readers in another process than the producer's (its own get entries with the appends).
    producer = await serve(settings_for(redis_url), Script(delay=0.05))
    client = await serve(settings_for(redis_url), Script(delay=0.05))
    hub: Hub = client.app[HUB]
    real = hub._on_message
    bad_sid: list[str] = []

    def fragile(message: dict[str, Any]) -> None:
        if bad_sid and bad_sid[0] in str(message.get("channel")) and message.get("type") == "message":
            raise RuntimeError("injected")
        real(message)

    hub._on_message = fragile  # type: ignore[method-assign]
    healthy = await create_session(producer, " ".join(["ok"] * 20))
    bad = await create_session(producer, " ".join(["doomed"] * 20))
    bad_sid.append(bad["id"])
    assert error_code(await read_to_the_end(client, bad["id"])) == "internal_error"
    assert logged_traceback(caplog, "could not be handled")
    assert text_of((await wait_terminal(client, healthy["id"])).events) == "ok " * 20
    assert client.app[FAULTS] == [] and producer.app[FAULTS] == []


async def test_hub_fetch_loop_survives_one_sessions_unreadable_stream(
    serve: Callable[..., Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(settings_for(redis_url), Script(delay=0.05))
    store = client.app[STORE]
    real = store.read_after_many
    bad_sid: list[str] = []

    async def fragile(cursors: dict[str, str], *, count: int) -> Any:
        if bad_sid and bad_sid[0] in cursors:
            raise KeyError("injected: an entry without its fields")
        return await real(cursors, count=count)

    store.read_after_many = fragile
    healthy = await create_session(client, " ".join(["ok"] * 20))
    bad = await create_session(client, " ".join(["doomed"] * 20))
    healthy_reader = asyncio.create_task(wait_terminal(client, healthy["id"]))
    await asyncio.sleep(0.2)  # both streams are read by the hub now
    bad_sid.append(bad["id"])
    assert error_code(await read_to_the_end(client, bad["id"])) == "internal_error"
    assert logged_traceback(caplog, "its stream cannot be read")
    assert text_of((await healthy_reader).events) == "ok " * 20
    assert (await get_session(client, bad["id"]))["status"] == "failed"


async def test_sweep_survives_a_failed_round_and_fails_an_answer_stuck_in_queued(
    serve: Callable[..., Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    script = Script()
    # The producer's own deadline (1 s) cannot end a task that swallows its cancel; the sweep can.
    client = await serve(settings_for(redis_url, answer_deadline_seconds=1.0), script)
    store = client.app[STORE]
    real = store.missing_leases
    failures = 1

    async def flaky(sids: Sequence[str]) -> list[str]:
        nonlocal failures
        if failures:
            failures -= 1
            raise TypeError("injected")
        missing: list[str] = await real(sids)
        return missing

    store.missing_leases = flaky
    started = time.monotonic()
    created = await create_session(client, "wedge")
    stream = await wait_terminal(client, created["id"])
    assert error_code(stream) == "internal_error"
    assert 1.0 < time.monotonic() - started < 6.0  # the bound: deadline + 2 lease TTLs, then one sweep
    assert failures == 0 and logged_traceback(caplog, "lease sweep failed")
    assert (await get_session(client, created["id"]))["status"] == "failed"
    script.release.set()
    assert client.app[FAULTS] == []


@pytest.mark.parametrize("task", ["producer-leases", "producer-batcher", "hub-fetch", "hub-sweep", "hub-listen"])
async def test_a_shared_task_that_ends_makes_the_instance_unready_and_calls_for_a_stop(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, task: str
) -> None:
    targets = {
        "producer-leases": (producer.Producers, "_keep_leases"),
        "producer-batcher": (producer._Batcher, "_run"),
        "hub-fetch": (Hub, "_fetch_loop"),
        "hub-sweep": (Hub, "_sweep"),
        "hub-listen": (Hub, "_listen"),
    }

    async def ends(self: object) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("injected: a bug outside any session")

    monkeypatch.setattr(*targets[task], ends)
    stopped = asyncio.Event()
    app = create_app(settings_for(redis_url), provider=Script(), on_fatal=stopped.set)
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    try:
        await asyncio.wait_for(stopped.wait(), 5)
        resp = await client.get("/readyz")
        assert resp.status == 503 and task in (await resp.json())["detail"]
        assert any(r.levelno == logging.CRITICAL and task in r.getMessage() for r in caplog.records)
    finally:
        await client.close()


def test_chatbot_serve_exits_non_zero_when_a_shared_task_ends(redis_url: str) -> None:
    """The real command: its supervisor sees a non-zero exit status and restarts it."""
    port = free_port()
    code = (
        "import asyncio, sys\n"
        "from chatbot import cli, producer\n"
        "async def ends(self):\n"
        "    await asyncio.sleep(0.5)\n"
        "    raise RuntimeError('injected')\n"
        "producer.Producers._keep_leases = ends\n"
        f"sys.exit(cli.main(['serve', '--port', '{port}']))\n"
    )
    env = {**os.environ, "CHATBOT_REDIS_URL": redis_url, "CHATBOT_PROVIDER": "demo", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "shared task producer-leases ended unexpectedly" in done.stderr
    assert "RuntimeError: injected" in done.stderr


async def test_reasoning_from_a_provider_is_stored_apart_from_the_text(
    serve: Callable[..., Any], redis_url: str
) -> None:
    class Thinker(Script):
        async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
            yield Reasoning("Think. ")
            yield "Say "
            yield Reasoning("Think again.")
            yield "it."
            yield Finish("stop")

    client = await serve(settings_for(redis_url), Thinker())
    created = await create_session(client, "go")
    stream = await wait_terminal(client, created["id"])
    assert text_of(stream.events) == "Say it." and text_of(stream.events, "reasoning") == "Think. Think again."
    session = await get_session(client, created["id"])
    assert (session["text"], session["reasoning"]) == ("Say it.", "Think. Think again.")


async def test_a_provider_yielding_anything_but_text_fails_only_that_answer(
    serve: Callable[..., Any], redis_url: str
) -> None:
    class Wrong(Script):
        async def stream(self, messages: Sequence[Message]) -> AsyncIterator[Any]:
            if messages[-1].content == "wrong":
                yield [{"type": "text", "text": "Hi"}]
                return
            async for item in super().stream(messages):
                yield item

    client = await serve(settings_for(redis_url), Wrong())
    assert error_code(await wait_terminal(client, (await create_session(client, "wrong"))["id"])) == "internal_error"
    assert text_of((await wait_terminal(client, (await create_session(client, "right now"))["id"])).events) == (
        "right now "
    )
