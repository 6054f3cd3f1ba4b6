"""The hub's pub/sub connection to one Redis, read without a coroutine per message.

redis-py's `PubSub.get_message` goes through its health check, retry wrapper, connection and parser layers
for every message, and arms a timer per call when given a timeout: 24.8 µs of CPU per notice as the hub
read them (19.5 without the timeout), against 8.6 through this class (`bench/pubsub_cost.py`, 2,500
notices a second on uvloop). A reader on another instance than its answer's producer gets one notice per
token, so that cost is paid per token there.

`DirectPubSub` is shaped like the part of redis-py's `PubSub` the hub uses (`subscribe`, `unsubscribe`,
`get_message`, `aclose`; messages as dicts with `type`, `channel` and `data`). An asyncio protocol parses
every complete reply of each read with hiredis (the parser redis-py itself uses) into an inbox that
`get_message` empties without suspending. It speaks RESP2 over TCP or a Unix socket, with AUTH when the URL
has a password and CLIENT SETNAME when it names the client; a TLS URL keeps redis-py's `PubSub`
(`Store.notices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from typing import Any, cast

import hiredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)


class DirectPubSub:
    """One pub/sub connection: subscribe and unsubscribe write at once, replies queue until `get_message`.

    A reply that is not a pub/sub message (an error: a lost AUTH, a protocol error) or a lost connection
    makes the next `get_message` raise a `redis.exceptions.RedisError`; the caller then opens a new one.
    When nothing has arrived for `HEALTH_SECONDS` a PING is sent; if nothing arrives in the next
    `HEALTH_SECONDS` either, the connection counts as dead (a half-open TCP connection, a Redis that stopped
    answering) and is closed, as redis-py's `health_check_interval` would.

    A message whose data is not UTF-8 comes as data None (the caller reads what it names elsewhere) instead
    of failing the connection; one on a channel that is not UTF-8 (never one subscribed here) is dropped.
    """

    HEALTH_SECONDS = 30.0
    # Messages parsed and not yet taken: past this the connection stops reading until half are taken, so a
    # caller that falls behind leaves them in Redis's output buffer (whose `client-output-buffer-limit
    # pubsub` then closes the connection, as it would redis-py's) instead of growing this process.
    INBOX_LIMIT = 4096

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        client_name: str | None = None,
        connect_timeout: float | None = 2.0,
    ) -> None:
        self._where = path if path is not None else f"{host}:{port}"
        self._host, self._port, self._path = host, port, path
        self._username, self._password = username, password
        self._client_name = client_name
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        self._closed = False

    async def subscribe(self, *channels: str) -> None:
        await self._send("SUBSCRIBE", *channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._send("UNSUBSCRIBE", *channels)

    async def get_message(self, timeout: float | None = None) -> dict[str, Any] | None:  # noqa: ASYNC109
        """The next reply (`subscribe`, `unsubscribe` or `message`), or None after `timeout` seconds.

        Raises RedisConnectionError once the connection is lost, ResponseError on an error reply; the
        messages that arrived before either come first.
        """
        protocol = self._protocol if self._protocol is not None else await self._connected()
        return await protocol.next(timeout)

    async def aclose(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self._protocol.close()

    async def _send(self, *command: str) -> None:
        protocol = await self._connected()
        protocol.write(_pack(*command))

    async def _connected(self) -> _Protocol:
        if self._protocol is not None:
            self._protocol.raise_if_broken()
            return self._protocol
        async with self._connecting:
            if self._protocol is None:
                self._protocol = await self._connect()
        return self._protocol

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("pub/sub connection closed")
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(self._protocol_factory, self._path)
                else:
                    _, protocol = await loop.create_connection(self._protocol_factory, self._host, self._port)
                if self._username or self._password:  # as redis-py: a user without a password sends ""
                    named = () if not self._username else (self._username,)
                    reply = await protocol.request(_pack("AUTH", *named, self._password or ""))
                    if isinstance(reply, hiredis.ReplyError):
                        raise AuthenticationError(f"pub/sub AUTH at {self._where}: {reply}")
                if self._client_name is not None:  # as redis-py names its connections (CLIENT LIST)
                    reply = await protocol.request(_pack("CLIENT", "SETNAME", self._client_name))
                    if isinstance(reply, hiredis.ReplyError):
                        raise ResponseError(f"pub/sub CLIENT SETNAME at {self._where}: {reply}")
        except BaseException as exc:
            if protocol is not None:  # refused, timed out or cancelled while logging in: no socket left open
                protocol.close()
            if isinstance(exc, TimeoutError):
                raise RedisConnectionError(f"pub/sub connection to {self._where} timed out") from exc
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"pub/sub connection to {self._where}: {exc}") from exc
            raise
        return protocol

    def _protocol_factory(self) -> _Protocol:
        return _Protocol(self.HEALTH_SECONDS, self.INBOX_LIMIT)


class _Protocol(asyncio.Protocol):
    """The connection's reader: every complete reply of a read goes to the inbox in that same callback."""

    def __init__(self, health_seconds: float, inbox_limit: int) -> None:
        self._reader = hiredis.Reader()  # bytes: each message is decoded apart, so a bad one stays its own
        self._inbox: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._failure: Exception | None = None
        self._reply: asyncio.Future[Any] | None = None  # a login command's (AUTH, CLIENT SETNAME)
        self._health_seconds = health_seconds
        self._heard = False
        self._pinged = False
        self._health: asyncio.TimerHandle | None = None
        self._inbox_limit = inbox_limit
        self._paused = False
        self._warned = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._health = asyncio.get_running_loop().call_later(self._health_seconds, self._check_health)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"pub/sub protocol error: {exc}"))
                return
            if reply is False:
                break
            self._take(reply)
        if self._inbox:
            if len(self._inbox) >= self._inbox_limit and self._transport is not None and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"pub/sub connection lost: {exc or 'closed by the server'}"))

    # -- for DirectPubSub ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.raise_if_broken()
        assert self._transport is not None
        self._transport.write(data)

    async def request(self, data: bytes) -> Any:
        """Write one command before any subscription and return its reply (a ReplyError is returned)."""
        self._reply = asyncio.get_running_loop().create_future()
        self.write(data)
        return await self._reply

    async def next(self, timeout: float | None) -> dict[str, Any] | None:  # noqa: ASYNC109
        if self._inbox:
            return self._pop()
        self.raise_if_broken()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._inbox:
            return self._pop()
        self.raise_if_broken()
        return None

    def _pop(self) -> dict[str, Any]:
        message = self._inbox.popleft()
        if self._paused and len(self._inbox) <= self._inbox_limit // 2 and self._failure is None:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return message

    def raise_if_broken(self) -> None:
        if self._failure is not None:
            raise self._failure.with_traceback(None)  # raised again on every call: no traceback piling up

    def close(self) -> None:
        self._fail(RedisConnectionError("pub/sub connection closed"))

    # -- inside --------------------------------------------------------------------------------------

    def _take(self, reply: Any) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(reply)
            return
        if isinstance(reply, hiredis.ReplyError):
            self._fail(ResponseError(str(reply)))
            return
        if not isinstance(reply, list) or len(reply) != 3:
            if reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
                return  # the health check's (a bare PONG while subscribed to nothing)
            self._fail(ResponseError(f"pub/sub reply not understood: {reply!r}"))
            return
        kind, channel, data = reply
        if not isinstance(kind, bytes) or not isinstance(channel, bytes):
            return  # UNSUBSCRIBE while subscribed to nothing: a nil channel, nothing to tell
        try:
            message = {
                "type": kind.decode(),
                "channel": channel.decode(),
                "data": data if isinstance(data, int) else data.decode(),
            }
        except UnicodeDecodeError:
            (log.debug if self._warned else log.warning)(
                "a pub/sub message on %r is not UTF-8; its session is read from its stream", channel
            )
            self._warned = True  # once a connection: whoever can publish there could flood the log
            try:
                message = {"type": kind.decode(), "channel": channel.decode(), "data": None}
            except UnicodeDecodeError:
                return  # a channel name we never subscribed
        self._inbox.append(message)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        if self._health is not None:
            self._health.cancel()
            self._health = None
        if self._transport is not None:
            self._transport.abort()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(self._failure)
        self._wake()

    def _check_health(self) -> None:
        """Every `health_seconds`: PING a quiet connection, close one that did not answer the last PING."""
        if self._failure is not None:
            return
        if self._heard or self._paused:  # paused: not reading by choice, the caller is behind
            self._heard, self._pinged = False, False
        elif self._pinged:
            self._fail(RedisConnectionError(f"pub/sub connection silent for {2 * self._health_seconds:.0f}s"))
            return
        else:
            self._pinged = True
            assert self._transport is not None
            self._transport.write(_pack("PING"))
        self._health = asyncio.get_running_loop().call_later(self._health_seconds, self._check_health)


def _pack(*command: str) -> bytes:
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]  # the stub says a 1-tuple
    return packed


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
