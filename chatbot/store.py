"""The event-stream store: the only module that issues Redis commands.

Every state change of a session is one Lua script over keys that share the
session's hash tag, so it is atomic and runs unchanged on Redis Cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fakeredis
import redis.asyncio as aioredis
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import events, history, keys
from .history import Turn
from .settings import Settings

log = logging.getLogger(__name__)

STATUSES = ("queued", "streaming", "done", "cancelled", "failed")
TERMINAL_STATUSES = frozenset({"done", "cancelled", "failed"})

# Seconds a request waits for a free pooled connection before the store counts as unavailable.
POOL_WAIT_SECONDS = 5.0

# KEYS: stream, meta, lease.  ARGV: event, data, maxlen, terminal status or "", ttl, channel.
# Appends unless the session is gone or already ended; returns {"ok", id, cancel flag}.
_APPEND = """
local state = redis.call('HMGET', KEYS[2], 'status', 'cancel')
local status = state[1]
if not status then return {'gone'} end
if status == 'done' or status == 'cancelled' or status == 'failed' then return {'ended'} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1], 'd', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], 'status', ARGV[4], 'terminal_id', id)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('DEL', KEYS[3])
elseif status == 'queued' then
  redis.call('HSET', KEYS[2], 'status', 'streaming')
end
redis.call('PUBLISH', ARGV[6], id)
return {'ok', id, state[2] or ''}
"""

# KEYS: stream, meta, lease.  ARGV: data, maxlen, ttl, channel.
# Ends a session whose producer's lease has lapsed; a no-op if it ended or the lease is back,
# 'gone' if the session itself vanished (expired, or Redis restarted without persistence).
_FAIL_ORPHAN = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return 'gone' end
if status == 'done' or status == 'cancelled' or status == 'failed' then return false end
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', 'error', 'd', ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'failed', 'terminal_id', id)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], id)
return id
"""

# KEYS: stream, meta, lease.  ARGV: done data, maxlen, ttl, channel, cancel channel, session id.
# Flags the cancel for whichever instance generates; if none holds the lease, ends it here.
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return 'unknown' end
if status == 'done' or status == 'cancelled' or status == 'failed' then return 'ended' end
redis.call('HSET', KEYS[2], 'cancel', '1')
if redis.call('EXISTS', KEYS[3]) == 0 then
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', 'done', 'd', ARGV[1])
  redis.call('HSET', KEYS[2], 'status', 'cancelled', 'terminal_id', id)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('PUBLISH', ARGV[4], id)
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 'requested'
"""

# KEYS: stream, meta, lease.  ARGV: owner, lease ms, ttl.
# Keeps a live producer's lease and keys alive; returns the cancel flag, or false if it ended.
_RENEW = """
local state = redis.call('HMGET', KEYS[2], 'status', 'cancel')
local status = state[1]
if not status or status == 'done' or status == 'cancelled' or status == 'failed' then return false end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return state[2] or ''
"""


# KEYS: history.  ARGV: encoded turn, max turns, max chars, ttl.
# Appends a turn, then drops the oldest until both caps hold; returns how many turns remain.
_APPEND_TURN = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
local turns = redis.call('LRANGE', KEYS[1], 0, -1)
local budget, keep = tonumber(ARGV[3]), 0
for i = #turns, 1, -1 do
  budget = budget - tonumber(string.match(turns[i], '^%d+'))
  if budget < 0 then break end
  keep = keep + 1
end
if keep == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('LTRIM', KEYS[1], -keep, -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return keep
"""

# KEYS: counter.  ARGV: window ms.  A fixed window: returns {count so far, ms until it resets}.
_RATE = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {count, ttl}
"""


class StoreUnavailable(Exception):
    """Redis could not be reached in time."""


@dataclass(frozen=True, slots=True)
class SessionMeta:
    id: str
    conversation_id: str
    message: str
    status: str
    terminal_id: str | None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What the store said to an append: the new id, or that the session ended or vanished."""

    id: str | None
    ended: bool
    cancel_requested: bool


def open_redis(settings: Settings) -> aioredis.Redis:
    """One bounded, blocking pool for the whole process; embedded fakeredis without a URL."""
    pool: aioredis.BlockingConnectionPool
    if settings.redis_url is None:
        pool = aioredis.BlockingConnectionPool(
            connection_class=FakeAsyncRedisConnection,
            server=fakeredis.FakeServer(),
            max_connections=settings.redis_pool_size,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
        )
    else:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            health_check_interval=30,
            # After a Redis restart every pooled connection is stale: reconnect and retry once or twice
            # instead of failing the command that happens to find it.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
    return aioredis.Redis(connection_pool=pool)


def _entry(raw: tuple[str, Mapping[str, str]]) -> events.Event:
    entry_id, fields = raw
    return events.Event(entry_id, fields["e"], fields["d"])


class Store:
    """Sessions, their event streams, leases and cancel flags in Redis."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, *, owner: str) -> None:
        self.redis = redis
        self._ttl = settings.session_ttl_seconds
        self._lease_ms = max(1, int(settings.lease_ttl_seconds * 1000))
        # The producer ends an answer before this many events; MAXLEN only guards against a runaway.
        self._maxlen = settings.max_answer_events + 16
        self._owner = owner
        self._append = redis.register_script(_APPEND)
        self._fail_orphan = redis.register_script(_FAIL_ORPHAN)
        self._cancel = redis.register_script(_CANCEL)
        self._renew = redis.register_script(_RENEW)
        self._append_turn = redis.register_script(_APPEND_TURN)
        self._history_ttl = settings.history_ttl_seconds
        self._history_turns = settings.history_max_turns
        self._history_chars = settings.history_max_chars
        self._rate = redis.register_script(_RATE)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def create_session(self, session_id: str, conversation_id: str, message: str) -> None:
        """Store a new queued session, its conversation and its producer's first lease, in one round trip.

        The lease goes first: no reader can see the session without it, so no sweep can call it orphaned.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.lease(session_id), self._owner, px=self._lease_ms)
            pipe.hset(
                keys.meta(session_id),
                mapping={
                    "conversation_id": conversation_id,
                    "message": message,
                    "status": "queued",
                    "created": f"{time.time():.3f}",
                },
            )
            pipe.expire(keys.meta(session_id), self._ttl)
            pipe.hset(keys.conversation(conversation_id), "last_session", session_id)
            pipe.expire(keys.conversation(conversation_id), self._ttl)
            await pipe.execute()

    async def count_hit(self, address: str, window_seconds: int) -> tuple[int, float]:
        """Count one hit for `address` in the current window: (hits so far, seconds until it resets)."""
        count, ttl_ms = await self._rate(keys=[keys.rate(address)], args=[window_seconds * 1000])
        return int(count), int(ttl_ms) / 1000

    async def conversation_exists(self, conversation_id: str) -> bool:
        """True while its last session or its history lives (they share a hash tag, so one EXISTS)."""
        return bool(await self.redis.exists(keys.conversation(conversation_id), keys.history(conversation_id)))

    async def history(self, conversation_id: str) -> list[Turn]:
        """The conversation's kept turns, oldest first."""
        raw: list[str] = await self.redis.lrange(keys.history(conversation_id), 0, -1)  # type: ignore[assignment]
        return [history.decode(item) for item in raw]

    async def append_turn(self, conversation_id: str, turn: Turn) -> int:
        """Add a turn, dropping the oldest beyond the turn and character caps; how many turns remain."""
        if self._history_turns == 0 or turn.chars > self._history_chars:
            return await self._drop_history(conversation_id)
        kept: int = await self._append_turn(
            keys=[keys.history(conversation_id)],
            args=[history.encode(turn), self._history_turns, self._history_chars, self._history_ttl],
        )
        return kept

    async def _drop_history(self, conversation_id: str) -> int:
        await self.redis.delete(keys.history(conversation_id))
        return 0

    async def session(self, session_id: str) -> SessionMeta | None:
        raw: dict[str, str] = await self.redis.hgetall(keys.meta(session_id))  # type: ignore[assignment]
        if "status" not in raw:
            return None
        return SessionMeta(
            id=session_id,
            conversation_id=raw.get("conversation_id", ""),
            message=raw.get("message", ""),
            status=raw["status"],
            terminal_id=raw.get("terminal_id"),
        )

    async def append(self, session_id: str, event: str, data: str, *, terminal_status: str = "") -> AppendResult:
        """Append one event; a terminal status also ends the session and starts its expiry."""
        reply: list[str] = await self._append(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[event, data, self._maxlen, terminal_status, self._ttl, keys.notify_channel(session_id)],
        )
        return _append_result(reply)

    async def append_many(self, items: Sequence[tuple[str, str, str]]) -> list[AppendResult | Exception]:
        """Append (session, event, data) items, none terminal, in one round trip; a result or error each.

        EVALSHA goes into the pipeline directly: a pipeline given Script objects checks them with an
        extra SCRIPT EXISTS round trip on every execute. A NOSCRIPT (Redis restarted) loads it and retries.
        """
        replies = await self._append_pipeline(items)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.redis.script_load(_APPEND)
            retry = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for i, reply in zip(retry, await self._append_pipeline([items[i] for i in retry]), strict=True):
                replies[i] = reply
        return [r if isinstance(r, Exception) else _append_result(r) for r in replies]

    async def _append_pipeline(self, items: Sequence[tuple[str, str, str]]) -> list[Any]:
        sha = self._append.sha
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid, event, data in items:
                pipe.evalsha(
                    sha, 3, keys.stream(sid), keys.meta(sid), keys.lease(sid),
                    event, data, self._maxlen, "", self._ttl, keys.notify_channel(sid),
                )  # fmt: skip
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def request_cancel(self, session_id: str, done_data: str) -> str:
        """'unknown', 'ended', 'requested' (a live producer will stop) or 'cancelled' (ended here)."""
        result: str = await self._cancel(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[done_data, self._maxlen, self._ttl, keys.notify_channel(session_id), keys.CANCEL_CHANNEL, session_id],
        )
        return result

    async def renew_leases(self, session_ids: Sequence[str]) -> dict[str, str | None]:
        """Renew the leases of this process's producers: id → cancel flag, or None if it ended."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                await self._renew(
                    keys=[keys.stream(sid), keys.meta(sid), keys.lease(sid)],
                    args=[self._owner, self._lease_ms, self._ttl],
                    client=pipe,
                )
            replies: list[Any] = await pipe.execute()
        return {
            sid: (reply if isinstance(reply, str) else None) for sid, reply in zip(session_ids, replies, strict=True)
        }

    async def missing_leases(self, session_ids: Sequence[str]) -> list[str]:
        """The sessions among these whose producer no longer holds a lease."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.exists(keys.lease(sid))
            replies: list[int] = await pipe.execute()
        return [sid for sid, alive in zip(session_ids, replies, strict=True) if not alive]

    async def fail_orphan(self, session_id: str, error_data: str) -> str | None:
        """End a session whose producer died with a terminal error: its id, None, or 'gone'."""
        result: str | None = await self._fail_orphan(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[error_data, self._maxlen, self._ttl, keys.notify_channel(session_id)],
        )
        return result

    async def read_from(self, session_id: str, start: str, *, count: int | None = None) -> list[events.Event]:
        """Events with id >= start (`-` for all); inclusive, so a resume can prove its id exists."""
        raw: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
            keys.stream(session_id), min=start, max="+", count=count
        )
        return [_entry(item) for item in raw]

    async def read_after_many(self, cursors: Mapping[str, str], *, count: int) -> dict[str, list[events.Event]]:
        """For each session, up to `count` events after its cursor, in one round trip."""
        sids = list(cursors)
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.xrange(keys.stream(sid), min=_exclusive(cursors[sid]), max="+", count=count)
            replies: list[Any] = await pipe.execute()
        return {sid: [_entry(item) for item in raw] for sid, raw in zip(sids, replies, strict=True)}

    async def text(self, session_id: str) -> str:
        """The answer so far: every token event's text, in order."""
        return "".join(
            event.payload()["text"] for event in await self.read_from(session_id, "-") if event.event == events.TOKEN
        )

    async def sources(self, session_id: str) -> list[Any]:
        """The answer's sources: the payload of its `sources` event, which can only be the first; [] if none."""
        first = await self.read_from(session_id, "-", count=1)
        if first and first[0].event == events.SOURCES:
            found: list[Any] = first[0].payload()["sources"]
            return found
        return []

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)  # a pool passed in is not closed otherwise


def _append_result(reply: list[str]) -> AppendResult:
    if reply[0] != "ok":
        return AppendResult(id=None, ended=True, cancel_requested=False)
    return AppendResult(id=reply[1], ended=False, cancel_requested=reply[2] == "1")


def _exclusive(event_id: str) -> str:
    return "(" + event_id


def channels(session_ids: Iterable[str]) -> list[str]:
    return [keys.notify_channel(sid) for sid in session_ids]
