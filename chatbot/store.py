"""The event-stream store: the only module that issues Redis commands.

Every state change of a session is one Lua script over keys that share the
session's hash tag, so it is atomic and runs unchanged on Redis Cluster. On a
cluster, batched commands go as one pipeline per master, and notices use
sharded pub/sub (`ShardedNotices`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import fakeredis
import hiredis
import redis.asyncio as aioredis
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterError,
    DataError,
    MaxConnectionsError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import events, history, keys
from .history import Turn
from .pubsub import DirectPubSub
from .settings import Settings

log = logging.getLogger(__name__)

STATUSES = ("queued", "streaming", "done", "cancelled", "failed")
TERMINAL_STATUSES = frozenset({"done", "cancelled", "failed"})

# Seconds a request waits for a free pooled connection before the store counts as unavailable.
POOL_WAIT_SECONDS = 5.0
CALL_TIMEOUT_SECONDS = 10.0  # one call on one Redis, its retries after a dropped connection included

# The producer's appends, shared by _APPEND and _APPEND_MANY as Lua functions.
#
# Every append names the id it expects the stream to end with: this producer's last acknowledged entry ("0-0"
# before its first). That makes a retry safe. Redis may run a script and then lose its reply (it died, or the
# connection dropped, after the append-only file had the entry); the client and the producer then send the
# same append again. When the stream ends one entry past the expected id, with an entry equal to this one,
# that entry is this append's own earlier try: its id is the answer and nothing is added. Any other tail
# means the store lost entries a reader may have seen (a failover, or a restart that dropped the last
# writes): the session ends with a retryable error placed after every id a reader may hold (at least the
# expected id + 1 ms, and not before the server's clock), and the answer is {"lost", id}.
#
# The stream's last id is kept in the meta hash (`last`), written by every append in the same script as its
# entry, so the check is a field of the HMGET the append makes anyway, not an XREVRANGE (which cost Redis
# about 3 µs of its 8-12 per entry, bench/RESULTS.md). The two cannot disagree: both keys share a slot and
# change in one script, which Redis replicates and persists as one unit, so a failover or a restart loses
# both or neither. Only writes that end the session leave `last` behind (an error, a cancel), and an append
# to an ended session is refused in any case. A stream that vanished alone (evicted under a `volatile-*`
# maxmemory policy, or deleted) is caught by XADD's NOMKSTREAM after the first entry. A session without the
# field (stored by a version before it) is checked against the stream's top as before.
#
# append(stream, meta, lease, event, data, maxlen, terminal status or "", ttl, channel, expected id) returns
# {"ok", id, cancel flag}, {"ended"}, {"gone"} or {"lost", id}. The notice published on `channel` is the entry
# itself ("<expected>\n<id>\n<event>\n<data>", see `Notice`), so a reader elsewhere needs no read; with no
# expected id (a producer that does not know its last id) there is no check and the notice is the bare id.
_APPEND_LUA = """
local function is_ended(status)
  return status == 'done' or status == 'cancelled' or status == 'failed'
end

local function earlier_try(stream, expected, event, data)
  local got
  if expected == '0-0' then
    got = redis.call('XRANGE', stream, '-', '+', 'COUNT', 2)
  else
    got = redis.call('XRANGE', stream, expected, '+', 'COUNT', 3)
    if not got[1] or got[1][1] ~= expected then return nil end
    table.remove(got, 1)
  end
  if #got == 1 and got[1][2][2] == event and got[1][2][4] == data then return got[1][1] end
  return nil
end

local function lose(stream, meta, lease, expected, maxlen, ttl, channel)
  local now = redis.call('TIME')
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if top then top = top[1] end
  -- after the producer's last entry, which the stream may have lost, and after the stream's top, which
  -- may be later (another writer appended meanwhile, within the same millisecond as this call)
  local after = tonumber(string.match(expected, '^(%d+)')) + 1
  if top then after = math.max(after, tonumber(string.match(top, '^(%d+)')) + 1) end
  local at = math.max(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), after)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, string.format('%.0f-0', at), 'e', 'error',
    'd', [==[LOST_TAIL_ERROR]==])
  redis.call('HSET', meta, 'status', 'failed', 'terminal_id', id)
  redis.call('EXPIRE', stream, ttl)
  redis.call('EXPIRE', meta, ttl)
  redis.call('DEL', lease)
  redis.call('PUBLISH', channel, id)
  return {'lost', id}
end

local function append(stream, meta, lease, event, data, maxlen, terminal, ttl, channel, expected)
  local state = redis.call('HMGET', meta, 'status', 'cancel', 'last')
  local status = state[1]
  if not status then return {'gone'} end
  if expected ~= '' then
    local last = state[3]
    if not last then
      local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
      if top then last = top[1] else last = '0-0' end
    end
    if last ~= expected then
      local id = earlier_try(stream, expected, event, data)
      if id then return {'ok', id, state[2] or ''} end
      if is_ended(status) then return {'ended'} end
      return lose(stream, meta, lease, expected, maxlen, ttl, channel)
    end
  end
  if is_ended(status) then return {'ended'} end
  local id
  if expected == '' or expected == '0-0' then
    id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', event, 'd', data)
  else
    -- after the first entry the stream must exist: one evicted or deleted alone is lost entries too
    id = redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*', 'e', event, 'd', data)
    if not id then return lose(stream, meta, lease, expected, maxlen, ttl, channel) end
  end
  if terminal ~= '' then
    redis.call('HSET', meta, 'status', terminal, 'terminal_id', id, 'last', id)
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', meta, ttl)
    redis.call('DEL', lease)
  elseif status == 'queued' then
    redis.call('HSET', meta, 'status', 'streaming', 'last', id)
  else
    redis.call('HSET', meta, 'last', id)
  end
  if expected ~= '' then
    redis.call('PUBLISH', channel, expected .. '\\n' .. id .. '\\n' .. event .. '\\n' .. data)
  else
    redis.call('PUBLISH', channel, id)
  end
  return {'ok', id, state[2] or ''}
end
""".replace(
    "LOST_TAIL_ERROR",
    events.error_data(
        "store_data_lost",
        "The store lost the end of this answer (a failover, or a restart); ask again.",
        retryable=True,
    ),
)

# KEYS: stream, meta, lease.  ARGV: event, data, maxlen, terminal status or "", ttl, channel, expected id.
_APPEND = (
    _APPEND_LUA
    + """
return append(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""
)


def _lua_name(name_of: Callable[[str], str]) -> str:
    """The Lua expression for `name_of(sid)` (a function of `keys`), for a script that builds a key itself."""
    before, marker, after = name_of("\x00").partition("\x00")
    if not marker or "'" in before + after or "\\" in before + after:
        raise ValueError(f"{name_of.__name__}: not a name a Lua string can spell")
    return f"'{before}' .. sid .. '{after}'"


# One Redis only (its keys span sessions, so never on a cluster): the batcher's entries in one call.
# ARGV: maxlen, ttl, then session id, event, data, expected id of each entry. The script names each session's
# keys itself (`keys`, as Lua expressions): three key names less to pack and send per entry.
# Entries are never terminal. One reply per entry: the new id alone when it was appended and no cancel is
# asked (nearly every entry; a nested reply per entry cost 8 % of Redis's instructions per entry,
# bench/append_script_cost.py), else _APPEND's reply, or {"error", message} when a command failed for that
# entry alone (the others stand; an entry fails before its first write or not at all).
_APPEND_MANY = (
    _APPEND_LUA
    + f"""
local out = {{}}
for i = 1, (#ARGV - 2) / 4 do
  local a = 4 * i - 1
  local sid = ARGV[a]
  local ok, reply = pcall(append, {_lua_name(keys.stream)}, {_lua_name(keys.meta)}, {_lua_name(keys.lease)},
    ARGV[a + 1], ARGV[a + 2], ARGV[1], '', ARGV[2], {_lua_name(keys.notify_channel)}, ARGV[a + 3])
  if ok then
    if reply[1] == 'ok' and reply[3] == '' then out[i] = reply[2] else out[i] = reply end
  elseif type(reply) == 'table' then
    out[i] = {{'error', tostring(reply.err)}}
  else
    out[i] = {{'error', tostring(reply)}}
  end
end
return out
"""
)

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

# KEYS: stream, meta, lease.  ARGV: data, maxlen, ttl, channel, cutoff (epoch seconds).
# Ends a session still `queued` that was created before the cutoff, lease or not; false otherwise.
_FAIL_QUEUED = """
local state = redis.call('HMGET', KEYS[2], 'status', 'created')
if state[1] ~= 'queued' or tonumber(state[2] or '0') > tonumber(ARGV[5]) then return false end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', 'error', 'd', ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'failed', 'terminal_id', id)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], id)
return id
"""

# KEYS: stream, meta, lease.  ARGV: done data, maxlen, ttl, channel, cancel channel, session id.
# The cancel channel is the global one on a single Redis, the session's own on a cluster.
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


# KEYS: history, conversation.  ARGV: encoded turn, max turns, max chars, ttl, session id.
# Appends a turn, then drops the oldest until both caps hold; returns how many turns remain. The conversation
# hash names the session whose turn went last, so a retry whose first try landed (its reply lost) adds nothing.
_APPEND_TURN = """
if redis.call('HGET', KEYS[2], 'last_turn') == ARGV[5] then return redis.call('LLEN', KEYS[1]) end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'last_turn', ARGV[5])
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
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


# Failures that the same command may not meet again soon: a lost connection, or a cluster whose topology is
# changing (a master failing over, a slot moving). The caller retries; nothing about the data is wrong.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    AskError,  # MovedError too
    ReadOnlyError,
)


def transient(exc: BaseException) -> bool:
    """True for a Redis failure that a retry a moment later may not meet (see TRANSIENT_ERRORS)."""
    return isinstance(exc, TRANSIENT_ERRORS)


@dataclass(frozen=True, slots=True)
class SessionMeta:
    id: str
    conversation_id: str
    message: str
    status: str
    terminal_id: str | None


@dataclass(frozen=True, slots=True)
class Transcript:
    """A session's answer so far, its reasoning so far, and its `sources` payload ([] if none)."""

    text: str
    reasoning: str
    sources: list[Any]


# The id before a stream's first entry, as a reader that read an empty stream has it.
FIRST = "0-0"


@dataclass(frozen=True, slots=True)
class Notice:
    """A message on a session's notice channel: an entry with the id before it, or only the new id.

    An entry's notice is `<previous id>\n<id>\n<event>\n<data>` (ids and event names have no line breaks, the
    data is one line of JSON); terminal events written by the other scripts (cancel, orphaned, lost tail) send
    only their id, and so do appends whose previous id the producer did not know.
    """

    previous: str | None
    id: str
    event: events.Event | None

    @classmethod
    def parse(cls, message: str) -> Notice:
        if "\n" not in message:
            return cls(None, message, None)
        previous, entry_id, name, data = message.split("\n", 3)
        return cls(previous, entry_id, events.Event(entry_id, name, data))


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What the store said to an append: the new id, or that the session ended or vanished."""

    id: str | None
    ended: bool
    cancel_requested: bool


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis's C `pack_command` instead of redis-py's Python packer.

    redis-py's asyncio connections always pack in Python, re-joining the growing buffer once per argument:
    for the batcher's one call of a four-entry batch (20 arguments) 32 µs against hiredis's 4 (1 entry: 17
    against 2.4). Arguments are encoded as redis-py encodes them (str as strict UTF-8, so a lone surrogate
    fails the same way); a type hiredis does not take goes to redis-py's packer, which raises its own error.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # "CLIENT SETINFO": the words go as separate arguments
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


def _with_hiredis_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """`cls` (plain, TLS or Unix-socket connection, as the URL chose) with hiredis's packer."""
    return type(cls.__name__, (_HiredisPacking, cls), {})


def _direct_notices(url: str | None) -> bool:
    """Whether the hub's notices come over a DirectPubSub (one Redis over TCP or a Unix socket), a connection
    outside the pool, rather than redis-py's PubSub, which takes one of the pool's (TLS, the embedded store)."""
    return url is not None and not url.startswith("rediss://")


def open_redis(settings: Settings) -> aioredis.Redis:
    """One bounded pool for the whole process (CHATBOT_REDIS_POOL_SIZE connections, the hub's pub/sub
    included: the pool holds one less when it is a DirectPubSub); embedded fakeredis without a URL.

    redis-py's plain pool fails at once when full; the store admits only as many calls at a time as it has
    connections for (`_gated`). Its blocking pool would wait instead, but takes a condition, a timer and a
    zero-timeout read per checkout: with both changes a call costs a quarter to two fifths less CPU
    (`bench/store_call_cost.py`, bench/RESULTS.md).
    """
    pool: aioredis.ConnectionPool
    if settings.redis_url is None:
        pool = aioredis.ConnectionPool(
            connection_class=FakeAsyncRedisConnection,
            server=fakeredis.FakeServer(),
            max_connections=settings.redis_pool_size,
            decode_responses=True,
        )
    else:
        pool = aioredis.ConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size - (1 if _direct_notices(settings.redis_url) else 0),
            decode_responses=True,
            socket_connect_timeout=2.0,
            # No timeout per socket operation: with one, redis-py wraps every send in a task of its own
            # (`asyncio.wait_for`) and every read in a timer. `_gated` bounds each whole call instead.
            socket_timeout=None,
            socket_keepalive=True,
            health_check_interval=30,
            # After a Redis restart every pooled connection is stale: reconnect and retry once or twice
            # instead of failing the command that happens to find it.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


def open_cluster(url: str, pool_size: int) -> RedisCluster:
    """redis-py's cluster client: a pool of at most `pool_size` connections per node.

    It retries nothing itself (its pipeline retry closes every connection of the client, including those
    other tasks are using); the store's callers retry, and the store refreshes the slot map on failures.
    """
    return RedisCluster.from_url(
        url,
        max_connections=pool_size,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        health_check_interval=30,
        require_full_coverage=False,  # while a master fails over, its slots are briefly uncovered
        retry=Retry(NoBackoff(), retries=0),
    )


async def open_store(settings: Settings, *, owner: str) -> Store:
    """The store CHATBOT_REDIS_URL and CHATBOT_REDIS_CLUSTER describe; says in the log which one it is.

    Raises StoreUnavailable if, with CHATBOT_REDIS_CLUSTER=auto, Redis cannot be asked within
    DETECT_SECONDS whether it is a cluster.
    """
    url = settings.redis_url
    if url is None:
        log.warning("CHATBOT_REDIS_URL is not set: using the embedded in-process store (one instance only)")
        return Store(open_redis(settings), settings, owner=owner)
    cluster = settings.redis_cluster == "on" or (settings.redis_cluster == "auto" and await _cluster_enabled(url))
    if not cluster:
        log.info("using Redis at %s: single node, pool of %d connections", url, settings.redis_pool_size)
        return Store(open_redis(settings), settings, owner=owner)
    client = open_cluster(url, settings.redis_pool_size)
    try:
        await client.initialize()
    except (RedisError, RedisClusterException, OSError) as exc:
        await client.aclose()
        raise StoreUnavailable(f"cannot read the topology of the Redis Cluster at {url}: {exc}") from exc
    log.info(
        "using Redis Cluster at %s: %d masters, pool of %d connections per node",
        url,
        len(client.get_primaries()),
        settings.redis_pool_size,
    )
    return Store(client, settings, owner=owner)


# How long start-up keeps asking an unreachable Redis whether it is a cluster (CHATBOT_REDIS_CLUSTER=auto).
DETECT_SECONDS = 30.0


async def _cluster_enabled(url: str) -> bool:
    """`cluster_enabled` from INFO cluster, asked of the node the URL names."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, decode_responses=True)
    give_up = time.monotonic() + DETECT_SECONDS
    try:
        while True:
            try:
                info: dict[str, Any] = await client.info("cluster")
                return bool(int(info.get("cluster_enabled", 0)))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() >= give_up:
                    raise StoreUnavailable(
                        f"Redis at {url} did not answer whether it is a cluster ({exc}); "
                        "set CHATBOT_REDIS_CLUSTER=on or off to start without asking"
                    ) from exc
                log.warning("Redis at %s is not reachable yet (%s); asking again", url, exc)
                await asyncio.sleep(0.5)
    finally:
        await client.aclose()


def _session_meta(session_id: str, raw: Mapping[str, str]) -> SessionMeta | None:
    if "status" not in raw:
        return None
    return SessionMeta(
        id=session_id,
        conversation_id=raw.get("conversation_id", ""),
        message=raw.get("message", ""),
        status=raw["status"],
        terminal_id=raw.get("terminal_id"),
    )


def _entry(raw: tuple[str, Mapping[str, str]]) -> events.Event:
    entry_id, fields = raw
    return events.Event(entry_id, fields["e"], fields["d"])


P = ParamSpec("P")
R = TypeVar("R")


def _gated(
    method: Callable[Concatenate[Store, P], Awaitable[R]],
) -> Callable[Concatenate[Store, P], Coroutine[Any, Any, R]]:
    """Wait for one of the process's connection slots; on a cluster, report its failures as RedisError.

    Neither pool the store uses waits for a free connection (redis-py's cluster client has no blocking
    pool; on one Redis the plain pool is used, see `open_redis`): a call beyond the pool would fail at
    once. So the store admits at most as many calls at a time as there are connections: the pool size on
    a cluster, where each call uses at most one connection per node; on one Redis, the pool size less the
    hub's pub/sub connection. A free slot costs no timer; only a wait for one is bounded.

    On one Redis each call is bounded as a whole, by CALL_TIMEOUT_SECONDS (RedisTimeoutError; redis-py
    closes a connection whose call was cut, so no late reply can answer the next one); the cluster client
    keeps redis-py's timeout per socket operation.
    """

    @functools.wraps(method)
    async def run(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(POOL_WAIT_SECONDS):
                    await slots.acquire()
            except TimeoutError:
                raise RedisConnectionError(f"no free Redis connection within {POOL_WAIT_SECONDS:.0f} s") from None
        else:
            await slots.acquire()  # free: returns at once
        try:
            give_up = 0.0
            while True:
                try:
                    if self._call_timeout is None:
                        return await method(self, *args, **kwargs)
                    try:
                        async with asyncio.timeout(self._call_timeout):
                            return await method(self, *args, **kwargs)
                    except TimeoutError:
                        raise RedisTimeoutError(f"Redis did not answer within {self._call_timeout:.0f} s") from None
                except MaxConnectionsError:
                    # A connection of the pool is still being closed after an error: nothing was sent.
                    now = time.monotonic()
                    give_up = give_up or now + POOL_WAIT_SECONDS
                    if now >= give_up:
                        raise
                    await asyncio.sleep(0.02)
        except RedisClusterException as exc:  # not a RedisError: e.g. a slot no master covers mid-failover
            raise ClusterError(str(exc)) from exc
        finally:
            slots.release()

    return run


class Store:
    """Sessions, their event streams, leases and cancel flags in Redis: one node, or a cluster."""

    def __init__(self, redis: aioredis.Redis | RedisCluster, settings: Settings, *, owner: str) -> None:
        self.redis = redis
        self.cluster = isinstance(redis, RedisCluster)
        self._url = settings.redis_url or ""
        self._ttl = settings.session_ttl_seconds
        self._lease_ms = max(1, int(settings.lease_ttl_seconds * 1000))
        # The producer ends an answer before this many events; MAXLEN only guards against a runaway.
        self._maxlen = settings.max_answer_events + 16
        self._owner = owner
        # Calls in flight at once (`_gated`): on one Redis, the hub's pub/sub holds one of the pool size's
        # connections (of the pool's own, or beside a pool one smaller: `open_redis`).
        self._slots = asyncio.Semaphore(settings.redis_pool_size - (0 if self.cluster else 1))
        self._call_timeout = None if self.cluster else CALL_TIMEOUT_SECONDS
        # On one Redis, calls of `_shared_round` that found every connection busy, each with its commands and
        # the future of its replies, and the one task that sends them together once a connection frees.
        self._waiting: list[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]] = []
        self._sender: asyncio.Task[None] | None = None
        # The id of each local producer's last entry ("0-0" before its first): the id before its next entry,
        # which its notice carries, and, on a cluster, what the stream must still end with (a tail lost in a
        # failover is noticed by the append script).
        self._last: dict[str, str] = {}
        # Told each entry a local producer appended, with the id before it: the hub delivers it to the
        # readers in this process without a pub/sub notice or a read. Told (id, "", None) when an append
        # found the session ended by another writer or its tail lost: the readers here must read the stream.
        self.on_entry: Callable[[str, str, events.Event | None], None] = lambda session_id, previous, event: None
        self._refreshed_at = 0.0
        # A classic PUBLISH on a cluster goes to every node; SPUBLISH only to the shard that owns the channel.
        publish = "'SPUBLISH'" if self.cluster else "'PUBLISH'"

        def script(source: str) -> AsyncScript:
            return redis.register_script(source.replace("'PUBLISH'", publish))

        self._append = script(_APPEND)
        self._append_many = None if self.cluster else script(_APPEND_MANY)
        self._fail_orphan = script(_FAIL_ORPHAN)
        self._fail_queued = script(_FAIL_QUEUED)
        self._cancel = script(_CANCEL)
        self._renew = script(_RENEW)
        self._append_turn = script(_APPEND_TURN)
        self._history_ttl = settings.history_ttl_seconds
        self._history_turns = settings.history_max_turns
        self._history_chars = settings.history_max_chars
        self._rate = script(_RATE)

    # -- notices ----------------------------------------------------------------------------------

    @property
    def control_channels(self) -> tuple[str, ...]:
        """Channels every hub listens to: the global cancel channel on one Redis, none on a cluster."""
        return () if self.cluster else (keys.CANCEL_CHANNEL,)

    def notices(self) -> Any:
        """A new pub/sub for hints, shaped like redis-py's PubSub (subscribe, unsubscribe, get_message, aclose).

        On a cluster it is a ShardedNotices: SSUBSCRIBE on the master that owns each channel's slot. On one
        Redis over TCP or a Unix socket it is a DirectPubSub (`pubsub.py`: a third of redis-py's CPU per
        message); over TLS, and on the embedded store, redis-py's own PubSub.
        """
        if isinstance(self.redis, RedisCluster):
            return ShardedNotices(self.redis, self._url)
        if not _direct_notices(self._url or None):
            return self.redis.pubsub()
        options = parse_url(self._url)
        return DirectPubSub(
            host=options.get("host", "localhost"),
            port=options.get("port", 6379),
            path=options.get("path"),
            username=options.get("username"),
            password=options.get("password"),
            client_name=name if isinstance(name := options.get("client_name"), str) else None,
        )

    # -- sessions ---------------------------------------------------------------------------------

    @_gated
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def create_session(self, session_id: str, conversation_id: str, message: str) -> None:
        """Store a new queued session, its conversation and its producer's first lease, in one round trip.

        The lease goes first: no reader can see the session without it, so no sweep can call it orphaned.
        """
        meta, conversation = keys.meta(session_id), keys.conversation(conversation_id)
        fields = {"conversation_id": conversation_id, "message": message, "status": "queued"}
        fields["created"] = f"{time.time():.3f}"
        commands: list[tuple[Any, ...]] = [
            ("SET", keys.lease(session_id), self._owner, "PX", self._lease_ms),
            ("HSET", meta, *itertools.chain.from_iterable(fields.items())),
            ("EXPIRE", meta, self._ttl),
            ("HSET", conversation, "last_session", session_id),
            ("EXPIRE", conversation, self._ttl),
        ]
        _raise_first(await self._shared_round(commands, [command[1] for command in commands]))
        self._last[session_id] = FIRST  # its producer runs here, and its stream is empty

    async def count_hit(self, address: str, window_seconds: int) -> tuple[int, float]:
        """Count one hit for `address` in the current window: (hits so far, seconds until it resets)."""
        key = keys.rate(address)
        command = ("EVALSHA", self._rate.sha, 1, key, window_seconds * 1000)
        reply = (await self._shared_round([command], [key]))[0]
        if isinstance(reply, NoScriptError):  # Redis restarted, or its scripts were flushed: load and again
            reply = (await self._gated_eval_rounds(self._rate, [command]))[0]
        count, ttl_ms = _raise_first([reply])[0]
        return int(count), int(ttl_ms) / 1000

    async def conversation_exists(self, conversation_id: str) -> bool:
        """True while its last session or its history lives (they share a hash tag, so one EXISTS)."""
        conversation = keys.conversation(conversation_id)
        command = ("EXISTS", conversation, keys.history(conversation_id))
        return bool(_raise_first(await self._shared_round([command], [conversation]))[0])

    async def history(self, conversation_id: str) -> list[Turn]:
        """The conversation's kept turns, oldest first."""
        key = keys.history(conversation_id)
        raw: list[str] = _raise_first(await self._shared_round([("LRANGE", key, 0, -1)], [key]))[0]
        return [history.decode(item) for item in raw]

    @_gated
    async def append_turn(self, conversation_id: str, session_id: str, turn: Turn) -> int:
        """Add the turn of `session_id`, dropping the oldest beyond the turn and character caps; how many turns
        remain. Once per session: a second call for the same session (a retry) adds nothing."""
        if self._history_turns == 0 or turn.chars > self._history_chars:
            await self.redis.delete(keys.history(conversation_id))
            return 0
        kept: int = await self._append_turn(
            keys=[keys.history(conversation_id), keys.conversation(conversation_id)],
            args=[history.encode(turn), self._history_turns, self._history_chars, self._history_ttl, session_id],
        )
        return kept

    async def session(self, session_id: str) -> SessionMeta | None:
        meta = keys.meta(session_id)
        raw: dict[str, str] = _raise_first(await self._shared_round([("HGETALL", meta)], [meta]))[0]
        return _session_meta(session_id, raw)

    async def session_and_read(self, session_id: str, start: str) -> tuple[SessionMeta | None, list[events.Event]]:
        """`session` and `read_from(start)` in one round trip (the session's keys share one slot, so one node)."""
        meta, stream = keys.meta(session_id), keys.stream(session_id)
        raw_meta, raw_entries = _raise_first(
            await self._shared_round([("HGETALL", meta), ("XRANGE", stream, start, "+")], [meta, stream])
        )
        return _session_meta(session_id, raw_meta), [_entry(item) for item in raw_entries]

    # -- the producer's writes --------------------------------------------------------------------

    @_gated
    async def append(
        self, session_id: str, event: str, data: str, *, terminal_status: str = "", by_producer: bool = True
    ) -> AppendResult:
        """Append one event; a terminal status also ends the session and starts its expiry.

        `by_producer=False`: an event from outside the producer's sequence (the hub ending a session whose
        data broke it). It names no expected tail: the producer's own appends may move the tail meanwhile,
        and a check against the producer's last id would then read as lost entries (`store_data_lost`).
        """
        previous = self._last.get(session_id, "") if by_producer else ""
        reply: list[str] = await self._append(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[event, data, self._maxlen, terminal_status, self._ttl, keys.notify_channel(session_id), previous],
        )
        result = self._appended(session_id, previous, event, data, reply)
        if terminal_status:
            self._last.pop(session_id, None)
        return result

    @_gated
    async def append_many(self, items: Sequence[tuple[str, str, str]]) -> list[AppendResult | Exception]:
        """Append (session, event, data) items, none terminal, in one round trip per node; a result or error each.

        On a cluster an item whose master failed gives that error (see `transient`) and the others stand.
        """
        previous = [self._last.get(sid, "") for sid, _, _ in items]
        if self._append_many is not None:
            return await self._append_batch(self._append_many, items, previous)
        commands = [
            ("EVALSHA", self._append.sha, 3, keys.stream(sid), keys.meta(sid), keys.lease(sid),
             event, data, self._maxlen, "", self._ttl, keys.notify_channel(sid), before)
            for (sid, event, data), before in zip(items, previous, strict=True)
        ]  # fmt: skip
        replies = await self._eval_rounds(self._append, commands)
        return [
            reply if isinstance(reply, Exception) else self._appended(sid, before, event, data, reply)
            for (sid, event, data), before, reply in zip(items, previous, replies, strict=True)
        ]

    async def _append_batch(
        self, script: AsyncScript, items: Sequence[tuple[str, str, str]], previous: list[str]
    ) -> list[AppendResult | Exception]:
        """One Redis: every item in one script call (one command for Redis and the client, not one per item)."""
        if not items:
            return []
        args = [
            arg
            for (sid, event, data), before in zip(items, previous, strict=True)
            for arg in (sid, event, data, before)
        ]
        command = ("EVALSHA", script.sha, 0, self._maxlen, self._ttl, *args)
        (reply,) = await self._eval_rounds(script, [command])
        if isinstance(reply, Exception):
            raise reply
        return [
            ResponseError(one[1])
            if type(one) is not str and one[0] == "error"
            else self._appended(sid, before, event, data, one)
            for (sid, event, data), before, one in zip(items, previous, reply, strict=True)
        ]

    def producing(self, session_id: str) -> bool:
        """True while a producer in this process appends to the session (from its creation to its end)."""
        return session_id in self._last

    def _appended(self, session_id: str, previous: str, event: str, data: str, reply: list[str] | str) -> AppendResult:
        result = _append_result(reply)
        if result.id is None:
            self._last.pop(session_id, None)
            if reply[0] == "lost":
                log.warning("session %s: its stream lost entries (failover, restart); ended with an error", session_id)
            if reply[0] != "gone":
                self.on_entry(session_id, "", None)
            return result
        self._last[session_id] = result.id
        if previous:
            self.on_entry(session_id, previous, events.Event(result.id, event, data))
        return result

    @_gated
    async def request_cancel(self, session_id: str, done_data: str) -> str:
        """'unknown', 'ended', 'requested' (a live producer will stop) or 'cancelled' (ended here)."""
        channel = keys.cancel_channel(session_id) if self.cluster else keys.CANCEL_CHANNEL
        result: str = await self._cancel(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[done_data, self._maxlen, self._ttl, keys.notify_channel(session_id), channel, session_id],
        )
        return result

    async def renew_leases(self, session_ids: Sequence[str]) -> dict[str, str | None]:
        """Renew the leases of this process's producers: id → cancel flag, or None if it ended."""
        live = set(session_ids)  # forget the last ids of answers that ended without a terminal append
        for sid in [sid for sid in self._last if sid not in live]:
            del self._last[sid]
        return await self._renew_many(session_ids)

    @_gated
    async def _renew_many(self, session_ids: Sequence[str]) -> dict[str, str | None]:
        commands = [
            ("EVALSHA", self._renew.sha, 3, keys.stream(sid), keys.meta(sid), keys.lease(sid),
             self._owner, self._lease_ms, self._ttl)
            for sid in session_ids
        ]  # fmt: skip
        replies = _raise_first(await self._eval_rounds(self._renew, commands))
        return {
            sid: (reply if isinstance(reply, str) else None) for sid, reply in zip(session_ids, replies, strict=True)
        }

    # -- readers ----------------------------------------------------------------------------------

    @_gated
    async def missing_leases(self, session_ids: Sequence[str]) -> list[str]:
        """The sessions among these whose producer no longer holds a lease."""
        commands = [("EXISTS", keys.lease(sid)) for sid in session_ids]
        replies = _raise_first(await self._rounds(commands, [command[1] for command in commands]))
        return [sid for sid, alive in zip(session_ids, replies, strict=True) if not alive]

    @_gated
    async def fail_orphan(self, session_id: str, error_data: str) -> str | None:
        """End a session whose producer died with a terminal error: its id, None, or 'gone'."""
        result: str | None = await self._fail_orphan(
            keys=[keys.stream(session_id), keys.meta(session_id), keys.lease(session_id)],
            args=[error_data, self._maxlen, self._ttl, keys.notify_channel(session_id)],
        )
        return result

    @_gated
    async def read_from(self, session_id: str, start: str, *, count: int | None = None) -> list[events.Event]:
        """Events with id >= start (`-` for all); inclusive, so a resume can prove its id exists."""
        raw: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
            keys.stream(session_id), min=start, max="+", count=count
        )
        return [_entry(item) for item in raw]

    @_gated
    async def read_after_many(self, cursors: Mapping[str, str], *, count: int) -> dict[str, list[events.Event]]:
        """For each session, up to `count` events after its cursor, in one round trip per node.

        On a cluster, sessions whose master failed (see `transient`) are left out while the others are
        answered; the caller asks again for those. If every read failed, the first error is raised.
        """
        sids = list(cursors)
        commands = [("XRANGE", keys.stream(sid), _exclusive(cursors[sid]), "+", "COUNT", count) for sid in sids]
        replies = await self._rounds(commands, [command[1] for command in commands])
        if all(isinstance(reply, Exception) for reply in replies) or any(
            isinstance(reply, Exception) and not transient(reply) for reply in replies
        ):
            _raise_first(replies)
        return {
            sid: [_entry(item) for item in raw]
            for sid, raw in zip(sids, replies, strict=True)
            if not isinstance(raw, Exception)
        }

    @_gated
    async def fail_queued(self, session_ids: Sequence[str], data: str, *, older_than: float) -> list[str]:
        """End each session still `queued` and created more than `older_than` seconds ago; those it ended."""
        cutoff = f"{time.time() - older_than:.3f}"
        ended = []
        for sid in session_ids:
            stream, meta, lease = keys.stream(sid), keys.meta(sid), keys.lease(sid)
            args: list[str | int] = [data, self._maxlen, self._ttl, keys.notify_channel(sid), cutoff]
            if await self._fail_queued(keys=[stream, meta, lease], args=args):
                ended.append(sid)
        return ended

    async def text(self, session_id: str) -> str:
        """The answer so far: every token event's text, in order."""
        return (await self.transcript(session_id)).text

    async def transcript(self, session_id: str) -> Transcript:
        """The answer so far, the reasoning so far (each its events' text in order) and the answer's sources."""
        text: list[str] = []
        reasoning: list[str] = []
        sources: list[Any] = []
        for event in await self.read_from(session_id, "-"):
            if event.event == events.TOKEN:
                text.append(event.payload()["text"])
            elif event.event == events.REASONING:
                reasoning.append(event.payload()["text"])
            elif event.event == events.SOURCES:
                sources = event.payload()["sources"]
        return Transcript("".join(text), "".join(reasoning), sources)

    async def close(self) -> None:
        if isinstance(self.redis, RedisCluster):
            await self.redis.aclose()
        else:
            await self.redis.aclose(close_connection_pool=True)  # a pool passed in is not closed otherwise

    # -- batched commands -------------------------------------------------------------------------

    async def _eval_rounds(self, script: AsyncScript, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """EVALSHA commands (first key at index 3) in rounds; a NOSCRIPT (a restarted or promoted node) loads
        the script and retries those commands.

        EVALSHA goes into the pipeline directly: a pipeline given Script objects checks them with an
        extra SCRIPT EXISTS round trip on every execute.
        """
        route = [command[3] for command in commands]
        replies = await self._rounds(commands, route)
        retry = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if retry:
            if isinstance(self.redis, RedisCluster):
                await self.redis.execute_command("SCRIPT LOAD", script.script, target_nodes=RedisCluster.PRIMARIES)
            else:
                await self.redis.script_load(script.script)
            again = await self._rounds([commands[i] for i in retry], [route[i] for i in retry])
            for i, reply in zip(retry, again, strict=True):
                replies[i] = reply
        return replies

    async def _shared_round(self, commands: Sequence[tuple[Any, ...]], route: Sequence[str]) -> list[Any]:
        """`_rounds` for a call that may share its round trip: a reply or an error each; raises RedisError
        (or OSError) if the round trip as a whole failed.

        On one Redis, a call that finds every connection busy (or others already waiting) does not wait for
        a connection of its own: its commands join those of the other waiting calls, and the first connection
        that frees sends them all as one pipeline. A burst of a hundred `POST /sessions` and `GET /events`
        thus costs a few round trips instead of a hundred, and redis-py's per-call cost (pool checkout, the
        retry wrapper, the pipeline object) is paid once per pipeline. ioredis (`enableAutoPipelining`) and
        node-redis do the same; redis-py has no such mode (redis/redis-py#3767, open). A cluster takes the
        plain gated path.
        """
        if self.cluster or (not self._waiting and not self._slots.locked()):
            return await self._gated_rounds(commands, route)
        replies: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((commands, replies))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting(), name="store-shared-rounds")
        return await replies

    @_gated
    async def _gated_rounds(self, commands: Sequence[tuple[Any, ...]], route: Sequence[str]) -> list[Any]:
        return await self._rounds(commands, route)

    @_gated
    async def _gated_eval_rounds(self, script: AsyncScript, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        return await self._eval_rounds(script, commands)

    async def _send_waiting(self) -> None:
        """Send the waiting calls' commands, as one pipeline per free connection, until none wait."""
        try:
            while self._waiting:
                try:
                    async with asyncio.timeout(POOL_WAIT_SECONDS):
                        await self._slots.acquire()
                except TimeoutError:
                    error = RedisConnectionError(f"no free Redis connection within {POOL_WAIT_SECONDS:.0f} s")
                    for _, replies in self._take_waiting():
                        replies.set_exception(error)
                    continue
                calls = self._take_waiting()
                try:
                    await self._send_together(calls)
                except BaseException:
                    for _, replies in calls:
                        replies.cancel()  # a no-op for those answered already
                    raise
                finally:
                    self._slots.release()
        finally:
            self._sender = None
            for _, replies in self._take_waiting():  # only if this task itself was cancelled (shutdown)
                replies.cancel()

    def _take_waiting(self) -> list[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]]:
        """The waiting calls, less those whose caller stopped waiting (cancelled): theirs are not sent."""
        waiting, self._waiting = self._waiting, []
        return [(commands, replies) for commands, replies in waiting if not replies.done()]

    async def _send_together(self, calls: list[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]]) -> None:
        """One pipeline for `calls`; each call's future gets its own replies, or the error that failed the
        round trip. A call whose own arguments cannot be sent (packing raised) fails alone: the others go
        again, each on its own."""
        if not calls:
            return
        flat = [command for commands, _ in calls for command in commands]
        give_up = 0.0
        while True:
            try:
                assert self._call_timeout is not None
                async with asyncio.timeout(self._call_timeout):
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for command in flat:
                            pipe.execute_command(*command)
                        replies = list(await pipe.execute(raise_on_error=False))
                break
            except MaxConnectionsError as exc:
                # A connection of the pool is still being closed after an error: nothing was sent.
                now = time.monotonic()
                give_up = give_up or now + POOL_WAIT_SECONDS
                if now < give_up:
                    await asyncio.sleep(0.02)
                    continue
                return _fail_all(calls, exc)
            except TimeoutError:
                return _fail_all(calls, RedisTimeoutError(f"Redis did not answer within {self._call_timeout:.0f} s"))
            except Exception as exc:
                if isinstance(exc, RedisError | OSError) and not isinstance(exc, DataError):
                    return _fail_all(calls, exc)  # the round trip failed, for every call in it alike
                # Packing raised (an argument redis-py cannot encode): only the call it belongs to may fail.
                if len(calls) == 1:
                    return _fail_all(calls, exc)
                for call in calls:
                    await self._send_together([call])
                return
        at = 0
        for commands, future in calls:
            if not future.done():
                future.set_result(replies[at : at + len(commands)])
            at += len(commands)

    async def _rounds(self, commands: Sequence[tuple[Any, ...]], route: Sequence[str]) -> list[Any]:
        """Pipelined commands, each routed by the key in `route`: a reply or an error each.

        One Redis: one pipeline (a plain call for a single command), and a lost connection raises. A
        cluster: one pipeline per master, all at once; a master that fails gives each of its commands that
        error while the others' replies stand, and the slot map is refreshed. A MOVED or ASK reply is
        followed by redis-py.
        """
        if not isinstance(self.redis, RedisCluster):
            if len(commands) == 1:
                # The batcher's one EVALSHA per batch: a plain call is the same command, the same retries
                # after a dropped connection and the same reply parsing, for 16-18 µs less CPU per call (a
                # pipeline adds its own object, list building and a task for `reset`'s shield;
                # `bench/store_call_cost.py`, bench/RESULTS.md).
                try:
                    return [await self.redis.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
                except ResponseError as exc:  # as the pipeline's raise_on_error=False gives it
                    return [exc]
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute(raise_on_error=False))
        replies: list[Any] = [None] * len(commands)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(route):
            try:
                groups.setdefault(_master(self.redis, key).name, []).append(i)
            except (RedisError, RedisClusterException) as exc:
                replies[i] = exc if isinstance(exc, RedisError) else ClusterError(str(exc))
        outcomes = await asyncio.gather(
            *(self._node_round([commands[i] for i in group]) for group in groups.values()), return_exceptions=True
        )
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            if isinstance(outcome, RedisClusterException):
                outcome = ClusterError(str(outcome))
            for n, i in enumerate(group):
                replies[i] = outcome if isinstance(outcome, Exception) else outcome[n]
        if any(isinstance(reply, Exception) and transient(reply) for reply in replies):
            await self._refresh_topology()
        return replies

    async def _node_round(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        assert isinstance(self.redis, RedisCluster)
        give_up = time.monotonic() + POOL_WAIT_SECONDS
        while True:
            try:
                async with self.redis.pipeline() as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    return list(await pipe.execute(raise_on_error=False))
            except MaxConnectionsError:
                # A connection of the node's pool is still being closed after an error: nothing was sent.
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(0.005)

    async def _refresh_topology(self) -> None:
        """Re-read the slot map (at most every REFRESH_SECONDS): a master failed over or a slot moved."""
        now = time.monotonic()
        if now - self._refreshed_at < REFRESH_SECONDS or not isinstance(self.redis, RedisCluster):
            return
        self._refreshed_at = now
        try:
            await self.redis.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("reading the cluster's slot map failed (%s); trying again on the next failure", exc)


REFRESH_SECONDS = 0.2


def _master(cluster: RedisCluster, key: str) -> ClusterNode:
    """The master that serves `key`'s slot in the client's slot map."""
    node = cluster.get_node_from_key(key)
    if node is None:
        raise ClusterError(f"no master serves the slot of {key}")
    return node


def _fail_all(calls: list[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]], error: Exception) -> None:
    for _, replies in calls:
        if not replies.done():
            replies.set_exception(error)


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _append_result(reply: list[str] | str) -> AppendResult:
    """An append script's reply: ["ok", id, cancel flag], [why it did not append, ...], or (from _APPEND_MANY)
    the id alone for an entry appended with no cancel asked."""
    if type(reply) is str:
        return AppendResult(id=reply, ended=False, cancel_requested=False)
    if reply[0] != "ok":
        return AppendResult(id=None, ended=True, cancel_requested=False)
    return AppendResult(id=reply[1], ended=False, cancel_requested=reply[2] == "1")


def _exclusive(event_id: str) -> str:
    return "(" + event_id


def channels(session_ids: Iterable[str]) -> list[str]:
    return [keys.notify_channel(sid) for sid in session_ids]


class ShardedNotices:
    """Sharded pub/sub on a cluster, shaped like redis-py's PubSub for the hub.

    One dedicated connection per master that owns a subscribed channel's slot (SSUBSCRIBE works only on
    the shard that owns the channel), each read by a task of its own into one inbox. Replies reach the hub
    as it knows them from a single Redis: `subscribe`, `unsubscribe`, `message`. A lost connection, a
    channel the server dropped while we still want it (its slot moved: Redis sends SUNSUBSCRIBE), or a
    channel whose slot the client's map now puts on another master, makes get_message raise; the hub then
    opens a new ShardedNotices, which reads the slot map afresh, and re-reads every session it serves.

    redis-py's own ClusterPubSub reads its per-node connections one after the other, each with the
    caller's timeout, so a notice on one master waits out the timeout of another; hence this class.
    """

    READ_POLL_SECONDS = 1.0
    CHECK_SECONDS = 2.0

    def __init__(self, cluster: RedisCluster, url: str) -> None:
        self._cluster = cluster
        self._url = url
        self._links: dict[str, tuple[aioredis.Redis, PubSub, asyncio.Task[None]]] = {}
        self._where: dict[str, str] = {}  # channel → name of the master we subscribed it on
        self._leaving: collections.Counter[str] = collections.Counter()  # SUNSUBSCRIBEs we sent, unanswered
        self._inbox: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self._mapped = False
        self._checked = time.monotonic()
        self._closed = False

    @property
    def masters(self) -> int:
        """How many masters this holds a connection to."""
        return len(self._links)

    async def subscribe(self, *channels: str) -> None:
        try:
            if not self._mapped:
                await self._cluster.nodes_manager.initialize()
                self._mapped = True
            for channel in channels:
                node = _master(self._cluster, channel)
                pubsub = await self._link(node)
                self._where[channel] = node.name
                await pubsub.ssubscribe(channel)
        except RedisClusterException as exc:
            raise ClusterError(str(exc)) from exc

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            name = self._where.pop(channel, None)
            if name is not None and name in self._links:
                self._leaving[channel] += 1
                await self._links[name][1].sunsubscribe(channel)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109 (PubSub's signature)
        """The next reply, or None after `timeout` seconds; raises what broke a connection."""
        self._check_routes()
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self._closed = True
        links = list(self._links.values())
        self._links.clear()
        for _, _, task in links:
            task.cancel()
        if links:
            await asyncio.wait([task for _, _, task in links], timeout=self.READ_POLL_SECONDS * 2)
        for client, pubsub, _ in links:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _link(self, node: ClusterNode) -> PubSub:
        if node.name in self._links:
            return self._links[node.name][1]
        options: dict[str, Any] = dict(parse_url(self._url))
        options.update(host=node.host, port=node.port)  # the URL's credentials and TLS, this master's address
        options.pop("db", None)
        pool = aioredis.ConnectionPool(
            **options,
            max_connections=1,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), retries=0),  # a lost connection is the hub's to handle, not a silent resubscribe
        )
        client = aioredis.Redis(connection_pool=pool)
        pubsub = client.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await client.aclose()
            raise
        task = asyncio.create_task(self._read(pubsub), name=f"notices-{node.name}")
        self._links[node.name] = (client, pubsub, task)
        return pubsub

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while not self._closed:
                # Bounded waits: redis-py can swallow a cancel that lands mid-read.
                message = await pubsub.get_message(timeout=self.READ_POLL_SECONDS)
                if message is not None:
                    self._take(message)
        except Exception as exc:  # whatever stops this reader must reach the hub, which then reconnects
            self._inbox.put_nowait(exc if isinstance(exc, RedisError) else RedisConnectionError(repr(exc)))

    def _take(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "smessage":
            self._inbox.put_nowait({"type": "message", "channel": channel, "data": message["data"]})
        elif kind == "ssubscribe":
            self._inbox.put_nowait({"type": "subscribe", "channel": channel, "data": message["data"]})
        elif kind == "sunsubscribe":
            if self._leaving[channel] > 0:
                self._leaving[channel] -= 1
                if not self._leaving[channel]:
                    del self._leaving[channel]
                self._inbox.put_nowait({"type": "unsubscribe", "channel": channel, "data": message["data"]})
            elif channel in self._where:
                self._inbox.put_nowait(ClusterError(f"the slot of {channel} moved to another master"))

    def _check_routes(self) -> None:
        """Every CHECK_SECONDS: does the client's slot map (kept fresh by MOVED replies) still agree?"""
        now = time.monotonic()
        if now - self._checked < self.CHECK_SECONDS:
            return
        self._checked = now
        for channel, name in self._where.items():
            try:
                moved = _master(self._cluster, channel).name != name
            except (RedisError, RedisClusterException):
                moved = True
            if moved:
                self._inbox.put_nowait(ClusterError(f"the slot of {channel} is served by another master now"))
                return
