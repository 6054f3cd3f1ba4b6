"""HTTP/1.1 to the upstreams, with each response body handed to its reader as it arrives.

httptools (llhttp, the parser of Node.js) parses the responses; this module
keeps the connections (one per answer in flight, kept alive for the next one)
and calls the body's consumer from the protocol's `data_received`. A streamed
answer's chunk so reaches the provider's parser, and the answer's text its
writer, without a task wake-up or a buffer in between. With aiohttp's
`StreamReader` and a wake-up per chunk, the upstream read was a third of the
service's CPU per token; pushed, the service relays 11 % more tokens per
CPU-second at 400 answers × 25 tokens/s (bench/RESULTS.md).

What it does not do, because no upstream request here needs it: proxies
(the SDKs are built with trust_env=False), redirects, compression (requests
say `Accept-Encoding: identity`), HTTP/2, `Expect: 100-continue`, upgrades.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import cast

import httptools

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024  # bytes a pulled body buffers before the socket stops being read


class ConnectionLost(ConnectionError):
    """The upstream closed the connection, or it broke, before the response was complete."""


class ProtocolViolation(ConnectionError):
    """The upstream's bytes are not HTTP/1.1 that httptools can read."""


# A body's consumer: called with each piece of the body as it arrives, then once with None (the body is
# complete) or the exception that ended it. Called from the event loop's I/O callbacks: it must not raise.
OnData = Callable[[bytes], None]
OnEnd = Callable[[BaseException | None], None]


class Body:
    """One response's body. Read it by pulling (`read`) or have it pushed (`consume`), not both.

    `received` counts its bytes so far (the idle watch reads it). `close()` gives the connection back for
    the next request if the body is complete and the upstream keeps it alive; otherwise it is closed,
    which tells the upstream to stop generating.
    """

    __slots__ = ("_chunks", "_conn", "_ended", "_error", "_on_data", "_on_end", "_size", "_waiter", "received")

    def __init__(self, conn: Connection | None) -> None:
        self._conn = conn
        self.received = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False  # every byte of the body has arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._on_data: OnData | None = None
        self._on_end: OnEnd | None = None

    @property
    def complete(self) -> bool:
        return self._ended and self._error is None

    @property
    def done(self) -> bool:
        """The body has ended: complete, or failed."""
        return self._ended or self._error is not None

    @property
    def released(self) -> bool:
        """Its connection has been given back (or it never had one)."""
        return self._conn is None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._on_data is not None:
            self._on_data(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def feed_eof(self) -> None:
        if self.done:
            return
        self._ended = True
        if self._on_end is not None:
            self._on_end(None)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the body with `exc`: a broken connection, or no byte for the idle timeout."""
        if self.done:
            return
        self._error = exc
        if self._conn is not None:
            self._conn.abort()
        if self._on_end is not None:
            self._on_end(exc)
        self._wake()

    def consume(self, on_data: OnData, on_end: OnEnd) -> None:
        """From now on, push: what was buffered at once, then each piece as it arrives, then the end."""
        self._on_data, self._on_end = on_data, on_end
        while self._chunks:  # a failed body's pieces too: the text before a failure is kept
            on_data(self._chunks.popleft())
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        if self._error is not None:
            on_end(self._error)
        elif self._ended:
            on_end(None)

    async def read(self) -> bytes:
        """The next buffered piece; b"" once the body is complete. Raises the error that ended it."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= HIGH_WATER // 4 and self._conn is not None:
            self._conn.resume()
        return data

    def close(self, linger: float = 0.0) -> None:
        """Give the connection back: to the pool if the body is complete, else closed.

        With `linger` (seconds), a body not yet complete may still end within that time and keep its
        connection (an answer that ended normally, whose last chunk is on its way); what arrives meanwhile
        is dropped. Without it, or once it is over, the connection closes, which stops the upstream.
        """
        if self._conn is None:
            return
        if linger <= 0 or self.done:
            self._give_back()
            return
        self._chunks.clear()
        self._size = 0
        self._conn.resume()
        timer = asyncio.get_running_loop().call_later(linger, self.fail, ConnectionLost("the body did not end"))

        def ended(exc: BaseException | None) -> None:
            timer.cancel()
            self._give_back()

        self._on_data, self._on_end = _drop, ended

    def _give_back(self) -> None:
        self._on_data = self._on_end = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.release(self.complete)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _drop(data: bytes) -> None:
    pass


class Response:
    """Status and headers of a response whose body is on its way."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: Body) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream; one request at a time."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self._pool = pool
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's parser was (its own llhttp settings), for sloppy self-hosted servers and
        # proxies: bare LF line ends, spaces after a chunk size, control bytes in header values.
        self._parser.set_dangerous_leniencies(
            lenient_headers=True, lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True
        )
        self._transport: asyncio.Transport | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[Response] | None = None  # the request waiting for its response's head
        self._body: Body | None = None
        self._pieces: list[bytes] = []  # the body's pieces parsed from the current read
        self._framed = True  # the body has a length or chunks (not ended by the connection's close)
        self._keep_alive = False
        self._paused = False
        self._closing = False  # aborted or half-closed: connection_lost is on its way
        self.closed = False
        self.expiry: asyncio.TimerHandle | None = None  # closes it once idle in the pool for too long

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, it has the methods

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
            self._flush()
        except httptools.HttpParserCallbackError as exc:  # a bug in a consumer; it must not hang the answer
            log.exception("a response body's consumer failed")
            self._lost(exc.__context__ or exc)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._lost(ProtocolViolation(f"the upstream's response is not valid HTTP/1.1: {exc}"))
        except Exception as exc:  # the same, from a piece given to the consumer after the parse
            log.exception("a response body's consumer failed")
            self._lost(exc)

    def eof_received(self) -> bool:
        self._closing = True
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        body = self._body
        if body is not None and not body.done and exc is None and not self._framed:
            body.feed_eof()  # a body without length or chunks ends where the connection does
        self._lost(exc or ConnectionLost("the upstream closed the connection"))

    def pause_writing(self) -> None:
        pass  # requests are small; nothing waits to write

    def resume_writing(self) -> None:
        pass

    @property
    def usable(self) -> bool:
        """Open, and not on its way to closing: it may carry a request."""
        return not (self.closed or self._closing) and self._transport is not None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []  # a chunked body's trailer fields came through on_header too

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:
            return  # 1xx: an interim response (llhttp reads the final one next)
        # Framed by a length or by chunks; otherwise the body ends where the connection does (RFC 9112 §6.3).
        self._framed = any(
            name.lower() == b"content-length" or (name.lower() == b"transfer-encoding" and b"chunked" in value.lower())
            for name, value in headers
        )
        body = self._body = Body(self)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Response(status, headers, body))
        else:
            self._lost(ProtocolViolation("the upstream sent a response nobody asked for"))

    def on_body(self, data: bytes) -> None:
        self._pieces.append(data)  # given to the body once the read is parsed: one piece per read, not per chunk

    def on_message_complete(self) -> None:
        self._flush()
        self._keep_alive = self._parser.should_keep_alive()
        if self._body is not None:
            self._body.feed_eof()

    # the pool's side

    def send(self, request: bytes) -> asyncio.Future[Response]:
        """Write one request; the future gets its response's head, or the error that ended the connection."""
        head = self._head = asyncio.get_running_loop().create_future()
        self._body = None
        self._headers = []
        self._keep_alive = False
        if not self.usable or self._transport is None:
            head.set_exception(ConnectionLost("the connection closed before the request"))
        else:
            self._transport.write(request)
        return head

    def pause(self) -> None:
        if not self._paused and self._transport is not None and not self.closed:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def release(self, complete: bool) -> None:
        """The request is over: the connection goes back to the pool if it can carry another one."""
        reusable = complete and self._keep_alive and self.usable
        if reusable:
            self.resume()
        else:
            self.abort()
        self._body = None
        self._pool.returned(self, reusable)

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None and not self.closed:
            self._transport.abort()

    def _flush(self) -> None:
        pieces = self._pieces
        if pieces:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            if self._body is not None:
                self._body.feed(data)

    def _lost(self, exc: BaseException) -> None:
        self._flush()  # what was parsed before the failure is part of the body
        first = not self.closed
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        if self._body is not None:
            self._body.fail(exc)
        if first:
            self._pool.lost(self)


class Pool:
    """Connections to upstreams, by (scheme, host, port): at most `limit` at once, idle ones kept `keepalive` s.

    Made outside any event loop; everything it holds belongs to the loop it first ran on, until `close()`.
    """

    def __init__(self, *, limit: int, keepalive: float) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._busy = 0  # connections checked out, or being opened
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()  # waiting for a slot
        self._ssl: ssl.SSLContext | None = None

    async def connection(
        self, key: tuple[str, str, int], *, pool_timeout: float | None, connect_timeout: float | None
    ) -> Connection:
        """A connection for one request, idle or new. The caller gives it back with `release()`, once.

        Raises TimeoutError if no connection frees up within `pool_timeout` or none opens within
        `connect_timeout` (seconds; None waits for ever), and OSError if none can be opened.
        """
        await self._slot(pool_timeout)
        try:
            return self._reuse(key) or await self._open(key, connect_timeout)
        except BaseException:
            self._free()
            raise

    async def _slot(self, within: float | None) -> None:
        if self._busy < self._limit and not self._queue:
            self._busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(within):
                await waiter  # `_free` hands its slot over: _busy is already counted for us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._free()  # handed over, but we leave: pass it on
            elif waiter in self._queue:  # not yet passed over by `_free`, which skips a cancelled waiter
                self._queue.remove(waiter)
            raise

    def _free(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._busy -= 1

    def _reuse(self, key: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if conn.usable:
                return conn
        return None

    async def _open(self, key: tuple[str, str, int], within: float | None) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._context() if scheme == "https" else None
        async with asyncio.timeout(within):
            _, conn = await loop.create_connection(
                lambda: Connection(self, key), host, port, ssl=tls, server_hostname=host if tls else None
            )
        return conn

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # the system's CAs; SSL_CERT_FILE and SSL_CERT_DIR apply
        return self._ssl

    def returned(self, conn: Connection, reusable: bool) -> None:
        if reusable:
            self._idle.setdefault(conn.key, []).append(conn)
            conn.expiry = asyncio.get_running_loop().call_later(self._keepalive, conn.abort)
        self._free()

    def lost(self, conn: Connection) -> None:
        """A connection closed: if it was idle, it leaves the pool (a busy one is released by its body)."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def close(self) -> None:
        """Close the idle connections; the pool can be used again, on any loop."""
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
