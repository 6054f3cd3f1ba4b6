"""How the store's calls use one Redis: within the pool's connections, and bounded when Redis stops answering.

The store takes redis-py's plain pool, which fails at once when every connection is in use, and admits only
as many calls at a time as the pool has connections besides the hub's pub/sub. It sets no timeout per socket
operation (with one, redis-py adds a task per send); each call is bounded as a whole instead. Both are
checked here on a real redis-server: a burst of calls never fails for want of a connection nor opens more
than the pool, and a Redis that stops answering (SIGSTOP) fails a call in time, after which each call still
gets its own reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection as RedisPyConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatbot import events, ids, keys, store
from chatbot.settings import Settings
from tests.conftest import RedisServer

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:  # its own: this test stops it
        yield server


def _clients(server: RedisServer) -> int:
    with server.client() as admin:
        return len(admin.client_list()) - 1  # less the admin connection itself


async def test_a_burst_of_calls_stays_within_the_pool(own_redis: RedisServer) -> None:
    settings = dataclasses.replace(Settings(), redis_url=own_redis.url, redis_pool_size=3)
    st = await store.open_store(settings, owner="test")
    pubsub = st.notices()  # as the hub does: one of the pool size's connections, beside the pool
    await pubsub.subscribe("chatbot:cancel")
    try:
        sids = [ids.new_id() for _ in range(40)]
        await asyncio.gather(*(st.create_session(sid, ids.new_id(), f"question {i}") for i, sid in enumerate(sids)))
        metas = await asyncio.gather(*(st.session(sid) for sid in sids))
        assert [m.message if m else None for m in metas] == [f"question {i}" for i in range(len(sids))]
        assert _clients(own_redis) <= 3
    finally:
        await pubsub.aclose()
        await st.close()


async def test_a_redis_that_stops_answering_fails_a_call_in_time_and_later_calls_get_their_own_replies(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "CALL_TIMEOUT_SECONDS", 0.5)
    settings = dataclasses.replace(Settings(), redis_url=own_redis.url)
    st = await store.open_store(settings, owner="test")
    try:
        first, second = ids.new_id(), ids.new_id()
        await st.create_session(first, ids.new_id(), "the first")
        await st.create_session(second, ids.new_id(), "the second")
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await st.session(first)  # its reply comes only after SIGCONT, to a connection that is closed
            assert time.monotonic() - started < 3
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        for _ in range(3):
            got = await asyncio.gather(st.session(second), st.session(first))
            assert [m.message if m else None for m in got] == ["the second", "the first"]
    finally:
        await st.close()


def _reads(server: RedisServer) -> int:
    """How many times Redis has read from its clients' sockets (INFO stats): one per round trip it was sent."""
    with server.client() as admin:
        return int(admin.info("stats")["total_reads_processed"])


@contextlib.contextmanager
def _stopped(server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP): what the store sends meanwhile waits in the sockets, unread, until it goes on."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def _pool_of_3(server: RedisServer) -> AsyncIterator[store.Store]:
    """A store on `server` with a pool of 3 (2 connections for calls, besides the hub's), both already open."""
    settings = dataclasses.replace(Settings(), redis_url=server.url, redis_pool_size=3)
    st = await store.open_store(settings, owner="test")
    try:
        await asyncio.gather(st.ping(), st.ping())
        yield st
    finally:
        await st.close()


async def _waiting(calls: int, st: store.Store) -> None:
    """Until `calls` store calls wait for a connection (each connection's call is stuck on a stopped Redis)."""
    for _ in range(200):
        if len(st._waiting) >= calls:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(st._waiting)} calls wait, not {calls}")


async def test_calls_that_wait_for_a_connection_share_one_round_trip(own_redis: RedisServer) -> None:
    """A burst of new sessions (POST /sessions) and of readers (GET /events) on a pool of 3: the calls that
    find both command connections busy are sent together when one frees, not one round trip each; every
    call still gets its own replies."""
    async with _pool_of_3(own_redis) as st:
        sids = [ids.new_id() for _ in range(100)]
        before = _reads(own_redis)
        with _stopped(own_redis):
            creating = [
                asyncio.create_task(st.create_session(sid, ids.new_id(), f"question {i}")) for i, sid in enumerate(sids)
            ]
            await _waiting(98, st)
        await asyncio.gather(*creating)
        found = await asyncio.gather(*(st.session_and_read(sid, "-") for sid in sids))
        assert [meta.message if meta else None for meta, _ in found] == [f"question {i}" for i in range(100)]
        assert all(entries == [] for _, entries in found)
        # 2 round trips for the calls that had a connection, a few for the 98 that waited (a pipeline of 490
        # commands can take Redis several reads), a few for the 100 reads after, 1 for each INFO here.
        # One round trip per call would be 200 reads.
        assert _reads(own_redis) - before < 30


async def test_in_a_shared_round_trip_a_call_that_cannot_be_sent_fails_alone(own_redis: RedisServer) -> None:
    """A message with a lone surrogate cannot be encoded: that session fails as it would on its own, and the
    sessions whose commands were to share its round trip are stored all the same."""
    async with _pool_of_3(own_redis) as st:
        sids = [ids.new_id() for _ in range(8)]
        messages = [f"question {i}" for i in range(8)]
        messages[4] = "bad \ud800"
        with _stopped(own_redis):
            creating = [
                asyncio.create_task(st.create_session(sid, ids.new_id(), message))
                for sid, message in zip(sids, messages, strict=True)
            ]
            await _waiting(6, st)
        outcomes = await asyncio.gather(*creating, return_exceptions=True)
        assert [type(outcome).__name__ for outcome in outcomes] == ["NoneType"] * 4 + ["UnicodeEncodeError"] + [
            "NoneType"
        ] * 3
        metas = await asyncio.gather(*(st.session(sid) for sid in sids))
        assert [meta.message if meta else None for meta in metas] == [*messages[:4], None, *messages[5:]]


async def test_a_waiting_call_given_up_is_not_sent_and_the_others_go_on(own_redis: RedisServer) -> None:
    """A POST whose client went away while its session waited for a connection: nothing of it is written."""
    async with _pool_of_3(own_redis) as st:
        sids = [ids.new_id() for _ in range(6)]
        with _stopped(own_redis):
            creating = [asyncio.create_task(st.create_session(sid, ids.new_id(), sid)) for sid in sids]
            await _waiting(4, st)
            creating[3].cancel()
            await asyncio.sleep(0.01)
        outcomes = await asyncio.gather(*creating, return_exceptions=True)
        assert isinstance(outcomes[3], asyncio.CancelledError)
        metas = await asyncio.gather(*(st.session(sid) for sid in sids))
        assert [meta.message if meta else None for meta in metas] == [*sids[:3], None, *sids[4:]]


async def test_a_redis_that_stops_answering_fails_every_waiting_call_in_time(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "CALL_TIMEOUT_SECONDS", 0.5)
    async with _pool_of_3(own_redis) as st:
        sids = [ids.new_id() for _ in range(20)]
        with _stopped(own_redis):
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(st.create_session(sid, ids.new_id(), sid) for sid in sids), return_exceptions=True
            )
            assert time.monotonic() - started < 3  # the two stuck calls, then the shared one: 0.5 s each
        assert all(isinstance(outcome, RedisTimeoutError) for outcome in outcomes), outcomes
        again = [ids.new_id() for _ in range(20)]
        await asyncio.gather(*(st.create_session(sid, ids.new_id(), sid) for sid in again))
        metas = await asyncio.gather(*(st.session(sid) for sid in again))
        assert [meta.message if meta else None for meta in metas] == again


async def test_rate_counts_go_on_after_redis_forgets_the_script_alone_or_in_a_shared_round(
    own_redis: RedisServer,
) -> None:
    async with _pool_of_3(own_redis) as st:
        assert (await st.count_hit("198.51.100.7", 60))[0] == 1
        with own_redis.client() as admin:
            admin.script_flush()
        hits, resets_in = await st.count_hit("198.51.100.7", 60)
        assert hits == 2 and 0 < resets_in <= 60
        with own_redis.client() as admin:
            admin.script_flush()
        with _stopped(own_redis):
            counting = [asyncio.create_task(st.count_hit(f"198.51.100.{i}", 60)) for i in range(10, 40)]
            await _waiting(28, st)
        assert [hits for hits, _ in await asyncio.gather(*counting)] == [1] * 30


PACKED = [
    ("EVALSHA", "f" * 40, 0, 10_000, 3600, "sid", "token", '{"t": "héllo 😀 \\u2028"}', "1700000000000-0"),
    ("CLIENT SETINFO", "LIB-NAME", "redis-py"),
    ("SET", b"raw \x00\xff bytes", 2**70),
    ("XADD", "chatbot:{x}:stream", "MAXLEN", "~", 1000, "*", "e", "token", "d", ""),
]


@pytest.mark.parametrize("command", PACKED, ids=["evalsha", "two-word-name", "bytes-and-big-int", "empty-value"])
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(command: tuple[Any, ...]) -> None:
    ours = store._with_hiredis_packing(RedisPyConnection)()
    theirs = RedisPyConnection()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


def test_a_lone_surrogate_fails_to_pack_as_it_does_in_redis_py() -> None:
    """Model output can hold one (JSON's "\\ud800"): it must fail that session's append, as before."""
    ours = store._with_hiredis_packing(RedisPyConnection)()
    with pytest.raises(UnicodeEncodeError):
        ours.pack_command("XADD", "k", "*", "d", "bad \ud800")
    with pytest.raises(UnicodeEncodeError):
        RedisPyConnection().pack_command("XADD", "k", "*", "d", "bad \ud800")


async def test_the_store_talks_to_redis_through_the_hiredis_packer(own_redis: RedisServer) -> None:
    settings = dataclasses.replace(Settings(), redis_url=own_redis.url)
    st = await store.open_store(settings, owner="test")
    try:
        assert isinstance(st.redis, Redis)
        assert issubclass(st.redis.connection_pool.connection_class, store._HiredisPacking)
        sid, message = ids.new_id(), 'héllo 😀 "quoted" \\ back\r\nslash \x00 nul'
        await st.create_session(sid, ids.new_id(), message)
        meta = await st.session(sid)
        assert meta is not None and meta.message == message
    finally:
        await st.close()


async def test_appends_go_on_after_redis_forgets_its_scripts_one_entry_or_many(own_redis: RedisServer) -> None:
    """A restarted or promoted Redis has no scripts: NOSCRIPT, then the script is loaded and the call sent again.

    On one Redis a batch of appends is one EVALSHA, whatever its size: a plain call, not a pipeline. Each
    must come through whole, in order and once; an error reply must come back as that command's result
    rather than raise. A round of several commands (lease renewals of two sessions) is still a pipeline,
    and takes NOSCRIPT the same way.
    """
    settings = dataclasses.replace(Settings(), redis_url=own_redis.url)
    st = await store.open_store(settings, owner="test")
    try:
        one, other = ids.new_id(), ids.new_id()
        await st.create_session(one, ids.new_id(), "the first")
        await st.create_session(other, ids.new_id(), "the second")
        expected: dict[str, list[str]] = {one: [], other: []}
        for round_ in range(3):
            with own_redis.client() as admin:
                admin.script_flush()
            single = [(one, "token", f'{{"text":"alone {round_}"}}')]
            results = await st.append_many(single)
            assert [type(r).__name__ for r in results] == ["AppendResult"]
            expected[one].append(single[0][2])
            with own_redis.client() as admin:
                admin.script_flush()
            both = [(one, "token", f'{{"text":"a{round_}"}}'), (other, "token", f'{{"text":"b{round_}"}}')]
            results = await st.append_many(both)
            assert [type(r).__name__ for r in results] == ["AppendResult", "AppendResult"]
            expected[one].append(both[0][2])
            expected[other].append(both[1][2])
        for sid, data in expected.items():
            assert [e.data for e in await st.read_from(sid, "-")] == data
        with own_redis.client() as admin:
            admin.script_flush()
        renewed = await st.renew_leases([one, other])  # two EVALSHAs in one pipeline
        assert set(renewed) == {one, other}
        # A reply that is an error (here a command Redis does not know) is the command's result, not a raise.
        (reply,) = await st._rounds([("NOSUCHCOMMAND", "x")], ["x"])
        assert isinstance(reply, ResponseError)
    finally:
        await st.close()


@contextlib.asynccontextmanager
async def _answer_begun(
    own_redis: RedisServer, *texts: str
) -> AsyncIterator[tuple[store.Store, Redis, str, list[str]]]:
    """A store, a plain client on its Redis, and a session whose producer appended `texts`: their ids."""
    view = await store.open_store(dataclasses.replace(Settings(), redis_url=own_redis.url), owner="test")
    raw = Redis.from_url(own_redis.url, decode_responses=True)
    try:
        sid = ids.new_id()
        await view.create_session(sid, ids.new_id(), "question")
        appended = [await _append(view, sid, text) for text in texts]
        yield view, raw, sid, appended
    finally:
        await raw.aclose()
        await view.close()


async def _append(view: store.Store, sid: str, text: str) -> str:
    """The producer's next token entry, through the batcher's call; its id."""
    (result,) = await view.append_many([(sid, "token", f'{{"text":"{text}"}}')])
    assert isinstance(result, store.AppendResult) and result.id is not None, result
    return result.id


async def _ended_as_lost(view: store.Store, sid: str, after: str) -> list[str]:
    """The session ended with `store_data_lost`, its error entry after the id `after`; the texts before it."""
    entries = await view.read_from(sid, "-")
    assert entries[-1].payload()["code"] == "store_data_lost"
    assert events.entry_key(entries[-1].id) > events.entry_key(after)
    meta = await view.session(sid)
    assert meta is not None and meta.status == "failed"
    return [e.data for e in entries[:-1]]


@pytest.mark.parametrize("ahead_ms", [0, 1, 60_000])
@pytest.mark.parametrize("last_field", ["kept", "absent"])
async def test_a_lost_tail_ends_the_session_after_the_streams_top_whatever_its_id(
    own_redis: RedisServer, ahead_ms: int, last_field: str
) -> None:
    """A producer whose last id is no longer the tail ends the session with `store_data_lost`. Its error
    entry must come after the stream's top: the entry that moved the tail may carry this millisecond's id
    or a later one (CI saw XADD refuse an id equal to the top, and the append fail instead).

    The tail moves as a writer through the store's scripts moves it, with the meta hash's `last` (kept);
    or the session has no `last` at all, as one stored by a version before the field, and the append checks
    the stream's own top (absent)."""
    async with _answer_begun(own_redis, "a") as (view, raw, sid, (first,)):
        assert await raw.hget(keys.meta(sid), "last") == first
        now_ms = int(time.time() * 1000)
        other = await raw.xadd(keys.stream(sid), {"e": "token", "d": '{"text":"b"}'}, id=f"{now_ms + ahead_ms}-5")
        if last_field == "kept":
            await raw.hset(keys.meta(sid), "last", other)
        else:
            await raw.hdel(keys.meta(sid), "last")
        (late,) = await view.append_many([(sid, "token", '{"text":"c"}')])  # checked against `first`: lost
        assert not isinstance(late, Exception), late
        assert await _ended_as_lost(view, sid, str(other)) == ['{"text":"a"}', '{"text":"b"}']


async def test_each_entry_of_a_batch_gets_its_own_answer(own_redis: RedisServer) -> None:
    """One call of the batcher's script answers each entry apart: appended (the id alone on the wire), appended
    with a cancel asked, not appended because its session ended, or an error of its own; the others stand."""
    async with _answer_begun(own_redis, "a") as (view, raw, plain, _):
        sids = {"plain": plain}
        for name in ("cancelled", "ended", "broken"):
            sids[name] = ids.new_id()
            await view.create_session(sids[name], ids.new_id(), "question")
            await _append(view, sids[name], "a")
        assert await view.request_cancel(sids["cancelled"], events.done_data("cancelled")) == "requested"
        await raw.hset(keys.meta(sids["ended"]), "status", "done")
        await raw.delete(keys.stream(sids["broken"]))
        await raw.set(keys.stream(sids["broken"]), "not a stream")
        results = await view.append_many([(sid, "token", '{"text":"b"}') for sid in sids.values()])
        got = dict(zip(sids, results, strict=True))
        assert isinstance(got["plain"], store.AppendResult) and got["plain"].id is not None
        assert not got["plain"].cancel_requested and not got["plain"].ended
        assert isinstance(got["cancelled"], store.AppendResult) and got["cancelled"].id is not None
        assert got["cancelled"].cancel_requested
        assert got["ended"] == store.AppendResult(id=None, ended=True, cancel_requested=False)
        assert isinstance(got["broken"], ResponseError) and "WRONGTYPE" in str(got["broken"])
        for name in ("plain", "cancelled"):
            assert [e.data for e in await view.read_from(sids[name], "-")] == ['{"text":"a"}', '{"text":"b"}']
        assert [e.data for e in await view.read_from(sids["ended"], "-")] == ['{"text":"a"}']


async def test_a_session_stored_before_the_last_field_goes_on(own_redis: RedisServer) -> None:
    """A session whose meta hash has no `last` (stored by a version before it, mid-answer during a rolling
    upgrade) is checked against the stream's top: its answer goes on, and the field is there after."""
    async with _answer_begun(own_redis, "a") as (view, raw, sid, _):
        await raw.hdel(keys.meta(sid), "last")
        second = await _append(view, sid, "b")
        assert [e.data for e in await view.read_from(sid, "-")] == ['{"text":"a"}', '{"text":"b"}']
        assert await raw.hget(keys.meta(sid), "last") == second
        meta = await view.session(sid)
        assert meta is not None and meta.status == "streaming"


@pytest.mark.parametrize("how", ["tail dropped", "stream deleted", "last absent, stream deleted"])
async def test_entries_lost_behind_the_producer_end_the_session_instead_of_a_gap(
    own_redis: RedisServer, how: str
) -> None:
    """What Redis can lose under a producer, done by hand: the last script's writes (a failover to a replica
    that missed it: the entry and the meta hash's `last` together), or the stream alone (evicted under a
    `volatile-*` maxmemory policy, or deleted). The next append ends the answer with `store_data_lost`
    rather than going on after a gap (or starting a new stream that holds only what comes next)."""
    async with _answer_begun(own_redis, "a", "b") as (view, raw, sid, (first, second)):
        if how == "tail dropped":
            await raw.xdel(keys.stream(sid), second)
            await raw.hset(keys.meta(sid), "last", first)
        else:
            if how.startswith("last absent"):
                await raw.hdel(keys.meta(sid), "last")
            await raw.delete(keys.stream(sid))
        (late,) = await view.append_many([(sid, "token", '{"text":"c"}')])
        assert not isinstance(late, Exception), late
        assert '{"text":"c"}' not in await _ended_as_lost(view, sid, second)


async def test_an_error_from_outside_the_producer_ends_a_session_whose_tail_moved_meanwhile(
    own_redis: RedisServer,
) -> None:
    """The hub ends a session whose data broke it while its producer may still be appending (CI saw it).

    The producer's append can land between the hub's reading of the producer's last id and its own append:
    checked against that id, the hub's error read as lost entries (`store_data_lost`). Sent as an event from
    outside the producer's sequence, it ends the session with the hub's own error.
    """
    settings = dataclasses.replace(Settings(), redis_url=own_redis.url)
    hub_side = await store.open_store(settings, owner="test")
    producer_side = await store.open_store(settings, owner="test")  # a second view: its appends move the tail
    try:
        outcomes = {}
        for by_producer in (False, True):
            sid = ids.new_id()
            await hub_side.create_session(sid, ids.new_id(), "question")
            (first,) = await hub_side.append_many([(sid, "token", '{"text":"a"}')])
            assert isinstance(first, store.AppendResult) and first.id is not None
            producer_side._last[sid] = first.id  # both know the same last id; the producer appends once more
            (second,) = await producer_side.append_many([(sid, "token", '{"text":"b"}')])
            assert isinstance(second, store.AppendResult) and second.id is not None
            error = '{"code":"internal_error","message":"The answer failed on the server.","retryable":true}'
            await hub_side.append(sid, "error", error, terminal_status="failed", by_producer=by_producer)
            entries = await hub_side.read_from(sid, "-")
            outcomes[by_producer] = (entries[-1].payload()["code"], [e.data for e in entries[:2]])
        assert outcomes[False] == ("internal_error", ['{"text":"a"}', '{"text":"b"}'])
        assert outcomes[True][0] == "store_data_lost"  # why the hub must not name the producer's tail
    finally:
        await hub_side.close()
        await producer_side.close()
