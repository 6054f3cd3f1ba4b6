"""The hub's pub/sub connection to one Redis (`chatbot.pubsub.DirectPubSub`), on real redis-server processes.

It must hand over what redis-py's PubSub did (every message, in order, with the acknowledgements), log in
where Redis asks for a password, and make the hub reconnect when the connection is lost, goes silent, or
gets a reply it does not understand; a message that is not UTF-8 stays that message's problem. The last
test runs the whole relay across two instances while a foreign publisher puts bytes that are not UTF-8
on the answer's notice channel: the reader still gets the model's whole text, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import uvloop
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from chatbot import keys, store
from chatbot.app import create_app
from chatbot.appkeys import FAULTS
from chatbot.pubsub import DirectPubSub
from chatbot.settings import Settings
from tests.conftest import RedisServer, close_promptly, make_settings
from tests.helpers import assert_well_formed, create_session, read_stream, text_of
from tests.oracle import BurstyDemo, expected_text

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:  # its own: these tests stop it, or kill its clients
        yield server


async def _notices(url: str) -> Any:
    settings = dataclasses.replace(Settings(), redis_url=url, redis_cluster="off")  # no INFO: the password may be wrong
    st = await store.open_store(settings, owner="test")
    await st.close()
    return st.notices()


@contextlib.asynccontextmanager
async def _subscribed(url: str, channel: str) -> AsyncIterator[Any]:
    """The store's notices, subscribed to `channel` (acknowledged), closed at the end."""
    pubsub = await _notices(url)
    try:
        await pubsub.subscribe(channel)
        await _until(pubsub, "subscribe")
        yield pubsub
    finally:
        await pubsub.aclose()


async def _until(pubsub: Any, kind: str, count: int = 1) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len([m for m in got if m["type"] == kind]) < count:
        message = await pubsub.get_message(timeout=5.0)
        assert message is not None, f"no {kind} within 5 s; got {got[-3:]}"
        got.append(message)
    return got


async def test_messages_come_in_order_with_the_acknowledgements_redis_py_gives(own_redis: RedisServer) -> None:
    pubsub = await _notices(own_redis.url)
    assert isinstance(pubsub, DirectPubSub)
    try:
        await pubsub.subscribe("a", "b")
        acks = await _until(pubsub, "subscribe", 2)
        assert [(m["type"], m["channel"], m["data"]) for m in acks] == [("subscribe", "a", 1), ("subscribe", "b", 2)]
        with own_redis.client() as client:
            pipe = client.pipeline(transaction=False)
            for i in range(2000):
                pipe.publish("ab"[i % 2], f"{i}\nline two é")
            pipe.execute()
        got = await _until(pubsub, "message", 2000)
        assert [(m["channel"], m["data"]) for m in got] == [("ab"[i % 2], f"{i}\nline two é") for i in range(2000)]
        await pubsub.unsubscribe("a")
        (ack,) = await _until(pubsub, "unsubscribe")
        assert (ack["channel"], ack["data"]) == ("a", 1)
        assert await pubsub.get_message(timeout=0.05) is None
    finally:
        await pubsub.aclose()


async def test_a_caller_that_falls_behind_leaves_messages_in_redis_and_loses_none(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DirectPubSub, "INBOX_LIMIT", 100)
    async with _subscribed(own_redis.url, "slow") as pubsub:
        with own_redis.client() as client:
            pipe = client.pipeline(transaction=False)
            for i in range(20_000):
                pipe.publish("slow", f"{i:05d}" + "x" * 1000)  # 20 MB: below the default hard limit, 32 MB
            pipe.execute()
            await asyncio.sleep(0.3)  # the connection reads until its inbox is full, then stops
            (sub,) = [c for c in client.client_list() if c["sub"] == "1"]
        # What this process has not read waits in Redis's output buffer for this client (the sockets' own
        # buffers hold a few MB more).
        assert int(sub["omem"]) > 10_000_000, sub
        got = await _until(pubsub, "message", 20_000)
        assert [m["data"] for m in got] == [f"{i:05d}" + "x" * 1000 for i in range(20_000)]


async def test_messages_of_megabytes_come_whole(own_redis: RedisServer) -> None:
    async with _subscribed(own_redis.url, "big") as pubsub:
        bodies = [f"{i}:" + "é" * (1_500_000 + i) for i in range(4)]  # about 3 MB each, in one pipeline
        with own_redis.client() as client:
            pipe = client.pipeline(transaction=False)
            for body in bodies:
                pipe.publish("big", body)
            pipe.execute()
        assert [m["data"] for m in await _until(pubsub, "message", 4)] == bodies


async def test_a_message_that_is_not_utf8_comes_without_data_and_the_next_one_comes_as_usual(
    own_redis: RedisServer,
) -> None:
    async with _subscribed(own_redis.url, "c") as pubsub:
        with redis.Redis(host="127.0.0.1", port=own_redis.port) as client:
            client.publish("c", b"\xff\xfe not text")
            client.publish("c", "text")
        got = await _until(pubsub, "message", 2)
        assert [m["data"] for m in got] == [None, "text"]


@pytest.mark.parametrize("user", [None, "relay"])
async def test_it_logs_in_where_redis_asks_for_a_password(user: str | None) -> None:
    acl = [] if user is None else ["--user", "relay", "on", ">s3cret", "allchannels", "+@all"]
    with RedisServer(extra=acl, password="s3cret") as server:
        auth = f"{user or ''}:s3cret@"
        good = await _notices(server.url.replace("redis://", f"redis://{auth}"))
        try:
            await good.subscribe("d")
            await _until(good, "subscribe")
            with redis.Redis(host="127.0.0.1", port=server.port, username=user, password="s3cret") as client:
                client.publish("d", "hello")
            (message,) = [m for m in await _until(good, "message") if m["type"] == "message"]
            assert message["data"] == "hello"
        finally:
            await good.aclose()
        bad = await _notices(server.url.replace("redis://", f"redis://{user or ''}:wrong@"))
        with pytest.raises(AuthenticationError):
            await bad.subscribe("d")
        await bad.aclose()
        none = await _notices(server.url)
        try:
            await none.subscribe("d")  # no password: Redis says so in its reply
            with pytest.raises(ResponseError, match="NOAUTH"):
                await none.get_message(timeout=5.0)
        finally:
            await none.aclose()


@pytest.mark.parametrize("spelled", ["relay@", "relay:@"])
async def test_a_user_without_a_password_logs_in_as_that_user(spelled: str) -> None:
    # As redis-py's pool does (AUTH relay ""); the default user here needs a password, so no AUTH fails.
    with RedisServer(extra=["--user", "relay", "on", "nopass", "allchannels", "+@all"], password="s3cret") as server:
        async with _subscribed(server.url.replace("redis://", f"redis://{spelled}"), "u"):
            with server.client() as client:
                (sub,) = [c for c in client.client_list() if c["sub"] == "1"]
            assert sub["user"] == "relay"


async def test_it_takes_the_client_name_the_url_gives(own_redis: RedisServer) -> None:
    async with _subscribed(f"{own_redis.url}?client_name=relay-7", "h"):
        with own_redis.client() as client:
            named = [c for c in client.client_list() if c.get("name") == "relay-7"]
        assert [c["sub"] for c in named] == ["1"]  # the subscribed connection is the named one


async def test_what_arrived_before_a_lost_connection_is_still_handed_over(own_redis: RedisServer) -> None:
    async with _subscribed(own_redis.url, "k") as pubsub:
        with own_redis.client() as client:
            for i in range(3):
                client.publish("k", f"before {i}")
        await asyncio.sleep(0.2)  # read into the inbox, not yet taken
        with own_redis.client() as client:
            assert client.client_kill_filter(_type="pubsub") == 1
        await asyncio.sleep(0.1)  # the loss is seen
        assert [(await pubsub.get_message(timeout=1.0))["data"] for _ in range(3)] == [f"before {i}" for i in range(3)]
        with pytest.raises(RedisConnectionError):
            await pubsub.get_message(timeout=1.0)


async def test_unsubscribing_from_nothing_is_harmless(own_redis: RedisServer) -> None:
    async with _subscribed(own_redis.url, "n") as pubsub:
        await pubsub.unsubscribe("n")
        await _until(pubsub, "unsubscribe")
        await pubsub.unsubscribe()  # Redis answers with a nil channel
        await pubsub.subscribe("n2")
        assert [m["channel"] for m in await _until(pubsub, "subscribe")] == ["n2"]


def _sockets_to(port: int) -> int:
    """This process's established TCP connections to `port` on 127.0.0.1."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone by now
            mine.add(os.readlink(f"/proc/self/fd/{fd}"))
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and f"socket:[{fields[9]}]" in mine:
                count += 1
    return count


async def test_a_login_that_times_out_leaves_no_socket_open() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # the kernel still accepts; AUTH gets no reply
        try:
            for _ in range(3):
                pubsub = DirectPubSub(host="127.0.0.1", port=server.port, password="s3cret", connect_timeout=0.3)
                with pytest.raises(RedisConnectionError, match="timed out"):
                    await pubsub.subscribe("t")
            await asyncio.sleep(0.1)
            assert _sockets_to(server.port) == 0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)


async def test_a_connection_the_server_closes_makes_the_next_read_fail(own_redis: RedisServer) -> None:
    async with _subscribed(own_redis.url, "e") as pubsub:
        with own_redis.client() as client:
            assert client.client_kill_filter(_type="pubsub") == 1
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await pubsub.get_message(timeout=5.0)
        assert time.monotonic() - started < 1
        with pytest.raises(RedisConnectionError):
            await pubsub.subscribe("f")  # the hub opens a new one instead


async def test_a_server_that_stops_answering_is_given_up_after_two_health_periods(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DirectPubSub, "HEALTH_SECONDS", 0.3)
    async with _subscribed(own_redis.url, "g") as pubsub:
        assert await pubsub.get_message(timeout=1.0) is None  # quiet but alive: the PING was answered
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RedisConnectionError, match="silent"):
                while await pubsub.get_message(timeout=0.2) is None:
                    assert time.monotonic() - started < 3
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)


async def test_a_reader_elsewhere_gets_the_whole_answer_while_a_foreign_publisher_writes_on_its_channel(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    tokens, message = 150, "a foreign publisher"
    apps = []
    for _ in range(2):
        app = create_app(
            make_settings("redis", redis_url), provider=BurstyDemo(tokens_per_second=300.0, answer_tokens=tokens)
        )
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        apps.append(client)
    producer, reader = apps
    try:
        sid = (await create_session(producer, message))["id"]
        stream = asyncio.create_task(read_stream(reader, sid))

        def garble() -> None:
            # Not UTF-8; text that is no notice; a notice whose ids are not entry ids.
            junk = [b"\xc3\x28 \xff", b"abc", b"1-0\nzzz\ntoken\n{}", b"7\n8\n9"]
            with redis.Redis.from_url(redis_url) as client:
                for i in range(20):
                    client.publish(keys.notify_channel(sid), junk[i % len(junk)])
                    time.sleep(0.02)

        await asyncio.to_thread(garble)
        got = await stream
        assert got.status == 200
        assert_well_formed(got.events)
        assert got.events[-1].type == "done"
        assert text_of(got.events) == expected_text(message, tokens)
        assert reader.app[FAULTS] == []
        # Each bad notice costs a read of the stream, not the listener's connection (redis-py's PubSub raised
        # UnicodeDecodeError out of get_message: every reader of the instance waited for a resubscribe).
        assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]
    finally:
        await close_promptly(reader)
        await close_promptly(producer)


@pytest.mark.parametrize(
    "scenario",
    [
        test_messages_come_in_order_with_the_acknowledgements_redis_py_gives,
        test_a_caller_that_falls_behind_leaves_messages_in_redis_and_loses_none,
        test_a_message_that_is_not_utf8_comes_without_data_and_the_next_one_comes_as_usual,
        test_what_arrived_before_a_lost_connection_is_still_handed_over,
        test_a_connection_the_server_closes_makes_the_next_read_fail,
        test_a_server_that_stops_answering_is_given_up_after_two_health_periods,
    ],
    ids=lambda scenario: scenario.__name__.removeprefix("test_")[:40],
)
def test_the_same_on_uvloop_which_chatbot_serve_runs(
    scenario: Callable[..., Coroutine[Any, Any, None]], own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop's transports differ from asyncio's (they do not subclass asyncio.Transport, for one).
    wants = inspect.signature(scenario).parameters
    uvloop.run(scenario(own_redis, monkeypatch) if "monkeypatch" in wants else scenario(own_redis))
