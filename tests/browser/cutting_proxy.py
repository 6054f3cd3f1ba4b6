"""A TCP proxy in front of the service that breaks event streams the ways real networks do."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

EVENTS_REQUEST = b"GET /events/"
LAST_EVENT_ID_HEADER = b"\r\nlast-event-id:"


@dataclass(eq=False)
class _Connection:
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    is_events: bool = False
    stalled: bool = False


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the service.

    With `cut_after`, each `/events/` connection is reset that many seconds after its request.
    `stall_open_streams()` silently drops everything the service sends on the event streams open
    at that moment: the browser sees a live connection on which nothing arrives (a phone waking up).
    """

    def __init__(self, target_port: int, *, cut_after: float | None = 0.3) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.events_requests: list[bytes] = []
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def resumed_requests(self) -> list[bytes]:
        """Event-stream requests that carried a Last-Event-ID header."""
        return [r for r in self.events_requests if LAST_EVENT_ID_HEADER in r.lower()]

    def stall_open_streams(self) -> int:
        """Black-hole the event streams open now; return how many."""
        streams = [c for c in self._connections if c.is_events]
        for connection in streams:
            connection.stalled = True
        return len(streams)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._connection(client_r, client_w))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            # A task cancelled by close() before its first step never runs its own `finally`.
            client_w.close()

        task.add_done_callback(done)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_w: asyncio.StreamWriter | None = None
        connection = _Connection()
        tasks: list[asyncio.Task[object]] = []
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._connections.add(connection)
            tasks = [
                asyncio.create_task(self._requests(client_r, upstream_w, connection)),
                asyncio.create_task(self._responses(upstream_r, client_w, connection)),
                asyncio.create_task(connection.cut.wait()),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if connection.cut.is_set():
                self.cuts += 1
                client_w.transport.abort()  # a reset, not a clean end: the browser must retry
                upstream_w.transport.abort()
        finally:
            # Both sockets are closed before the first await here, so a cancel mid-cleanup leaks neither.
            self._connections.discard(connection)
            writers = [w for w in (client_w, upstream_w) if w is not None]
            for writer in writers:
                writer.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in writers:
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                if chunk.startswith(EVENTS_REQUEST):
                    connection.is_events = True
                    self.events_requests.append(chunk)
                    if self.cut_after is not None:
                        asyncio.get_running_loop().call_later(self.cut_after, connection.cut.set)
                writer.write(chunk)
                await writer.drain()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                if not connection.stalled:
                    writer.write(chunk)
                    await writer.drain()
