"""The `text/event-stream` response: its headers, heartbeat comments and dead-peer detection.

Heartbeats are single comment lines (`: ping` CRLF) with no blank line after them: a comment is processed
when it is read, and a blank line after a block without data makes some clients (httpx-sse) dispatch an
empty event. Events are written whole by the handler, so a heartbeat always lands between two blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

from .events import SEP

log = logging.getLogger(__name__)

HEARTBEAT = b": ping" + SEP
CONTENT_TYPE = "text/event-stream"
# What a GET on /events/ answers with, for HEAD too. no-store: a shared cache must never keep a stream.
HEADERS = {
    "Content-Type": CONTENT_TYPE,
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass each write on at once
}
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
SLICE = 100  # heartbeats written in one turn of the event loop


class ClientGone(ConnectionResetError):
    """The client closed its connection before the response could start."""


class Heartbeats:
    """One task that writes `: ping` to every open event stream and notices peers that are gone.

    Every `interval` seconds each stream gets a heartbeat. A stream whose socket is gone, or whose buffer
    has stayed full (the peer stopped reading) for longer than its `send_timeout`, is aborted and its
    `on_gone` callback runs. One task and one timer serve all streams: a stream costs no task of its own.
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self.interval = interval
        self._streams: set[EventStream] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self, on_end: Callable[[asyncio.Task[None]], None] = lambda task: None) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeats")
        self._task.add_done_callback(on_end)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for done, stream in enumerate(list(self._streams), 1):
                if stream not in self._streams:  # it ended while an earlier slice waited
                    continue
                try:
                    await stream.beat(now)
                except Exception:  # one stream's fault must not stop every other stream's heartbeat
                    log.exception("heartbeat failed; ending that stream")
                    stream.gone()
                if done % SLICE == 0:
                    # A write costs tens of µs here (bench/RESULTS.md): a round over 10,000 streams in one
                    # turn would hold everything else for a few hundred ms. Between slices the loop serves it.
                    await asyncio.sleep(0)


class EventStream(web.StreamResponse):
    """A chunked event stream, kept alive by the process's `Heartbeats`; `on_gone` runs when the peer is gone.

    `send_timeout` (seconds) bounds a write that waits on a full socket buffer; on Linux it is also the
    socket's TCP_USER_TIMEOUT, so a peer that stops acknowledging is dropped by the kernel even while the
    stream is idle (the heartbeat keeps unacknowledged bytes in flight).
    """

    def __init__(self, *, heartbeats: Heartbeats, send_timeout: float) -> None:
        super().__init__(status=200, headers=HEADERS)
        self._heartbeats = heartbeats
        self._send_timeout = send_timeout
        self._on_gone: Callable[[], None] | None = None
        self._stuck_since: float | None = None
        self._sock: socket.socket | None = None
        self._saved_user_timeout: int | None = None
        # For `send_now`, set once the headers are out: the connection's transport and protocol, so that a
        # live entry's write reads two attributes rather than aiohttp's properties (one write per token).
        self._transport: asyncio.Transport | None = None
        self._protocol: RequestHandler | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the headers and join the heartbeats; ClientGone if the client has already left."""
        if self.prepared:
            return await super().prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("the client left before the response started")
        self._set_user_timeout(transport.get_extra_info("socket"))
        self.enable_chunked_encoding()
        writer = await super().prepare(request)
        self._heartbeats.add(self)
        protocol = request.protocol
        if isinstance(writer, StreamWriter) and writer.chunked and isinstance(protocol, RequestHandler):
            self._transport, self._protocol = transport, protocol  # else send_now declines; send() writes
        # aiohttp arms a keep-alive timer when a connection opens (75 s); a stream that began is busy, so the
        # timer could only find it so and lapse: dropping it now saves its 0.5 KB per open stream. aiohttp
        # sets the connection's keep-alive anew from this response when the stream ends.
        if isinstance(protocol, RequestHandler):
            protocol.keep_alive(True)
        # The headers are on their way (serialized, then sent with the first write): the dict need not be kept.
        self.headers.clear()
        return writer

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when a heartbeat finds the peer gone."""
        if not self.prepared:
            raise RuntimeError("the stream has not started")
        self._on_gone = callback

    async def send(self, data: bytes) -> None:
        """Write pre-encoded bytes; TimeoutError (and the connection aborted) if the client stops reading.

        A write waits only when the socket's buffer is full (the transport paused writing); only then is
        the wait bounded by a timer, so a reader that keeps up costs no timer per event.
        """
        request = self._req
        protocol = None if request is None else request.protocol
        if protocol is not None and not protocol.writing_paused:
            await self.write(data)  # cannot wait: aiohttp drains only a paused transport
            return
        try:
            async with asyncio.timeout(self._send_timeout):
                await self.write(data)
        except TimeoutError:
            self._abort()
            raise

    def send_now(self, data: bytes) -> bool:
        """Write pre-encoded bytes without waiting, or return False: the socket's buffer is full, or it closed.

        The hub calls this for each reader of a live entry (`hub.Subscriber.direct`), so it writes the
        HTTP/1.1 chunk to the transport itself: one `transport.write`, not aiohttp's awaited write path.
        Only whole chunks are ever written, by this and by aiohttp, so the two cannot interleave badly;
        the headers went out with the stream's first write (its `retry:` line), before any call here.
        """
        transport, protocol = self._transport, self._protocol
        if (
            transport is None
            or protocol is None
            or protocol.transport is not transport  # the connection was lost (aiohttp dropped it)
            or transport.is_closing()
            or protocol.writing_paused
            or self._eof_sent
        ):
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    async def beat(self, now: float) -> None:
        """Called by `Heartbeats`: write a heartbeat without waiting, or end a stream whose peer is gone."""
        request = self._req
        transport = None if request is None else request.transport
        if request is None or transport is None or transport.is_closing():
            self.gone()
            return
        if request.protocol.writing_paused:  # the peer is not reading: no more bytes, and not for ever
            self._stuck_since = self._stuck_since or now
            if now - self._stuck_since > self._send_timeout:
                self._abort()
                self.gone()
            return
        self._stuck_since = None
        writer = self._payload_writer
        if isinstance(writer, StreamWriter) and not self._eof_sent:
            # drain=False: the chunk goes to the transport and nothing waits (no compression, no callback).
            await writer.write(HEARTBEAT, drain=False)

    def gone(self) -> None:
        """The peer is gone: leave the heartbeats and tell the owner, once."""
        self._heartbeats.discard(self)
        callback, self._on_gone = self._on_gone, None
        if callback is not None:
            callback()

    async def stop(self) -> None:
        """Leave the heartbeats and put the socket's timeout back for the next request on the connection."""
        self._heartbeats.discard(self)
        self._on_gone = None
        self._transport = self._protocol = None
        self._restore_user_timeout()

    def _abort(self) -> None:
        # A peer that does not read never drains the buffer, so a graceful close would wait forever.
        if self._req is not None and self._req.transport is not None:
            self._req.transport.abort()

    def _set_user_timeout(self, sock: socket.socket | None) -> None:
        if _TCP_USER_TIMEOUT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            saved = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self._send_timeout * 1000))
        except OSError as exc:  # closed under us: the write of the headers will tell
            log.debug("TCP_USER_TIMEOUT not set: %s", exc)
            return
        self._sock, self._saved_user_timeout = sock, saved

    def _restore_user_timeout(self) -> None:
        sock, saved = self._sock, self._saved_user_timeout
        self._sock = self._saved_user_timeout = None
        if _TCP_USER_TIMEOUT is None or sock is None or saved is None or sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, saved)
