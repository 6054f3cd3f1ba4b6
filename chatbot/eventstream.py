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
from collections.abc import Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

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


class ClientGone(ConnectionResetError):
    """The client closed its connection before the response could start."""


class EventStream(web.StreamResponse):
    """A chunked event stream with a heartbeat task; `on_gone` runs when a write shows the peer is gone.

    `send_timeout` (seconds) bounds every write; on Linux it is also the socket's TCP_USER_TIMEOUT, so
    a peer that stops acknowledging is dropped by the kernel even while the stream is idle.
    """

    def __init__(self, *, heartbeat_seconds: float, send_timeout: float) -> None:
        if heartbeat_seconds <= 0:
            raise ValueError("heartbeat_seconds must be positive")
        super().__init__(status=200, headers=HEADERS)
        self._heartbeat_seconds = heartbeat_seconds
        self._send_timeout = send_timeout
        self._heartbeat: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._saved_user_timeout: int | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the headers and start the heartbeat; ClientGone if the client has already left."""
        if self.prepared:
            return await super().prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientGone("the client left before the response started")
        self._set_user_timeout(transport.get_extra_info("socket"))
        self.enable_chunked_encoding()
        writer = await super().prepare(request)
        self._heartbeat = asyncio.create_task(self._beat())
        return writer

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the heartbeat stops: the peer is gone, or `stop` was called."""
        if self._heartbeat is None:
            raise RuntimeError("the stream has not started")
        self._heartbeat.add_done_callback(lambda _: callback())

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

    async def stop(self) -> None:
        """End the heartbeat and put the socket's timeout back for the next request on the connection."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        self._restore_user_timeout()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self.send(HEARTBEAT)
            except (ConnectionResetError, TimeoutError, RuntimeError):
                return  # RuntimeError: written after the end

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
