"""A TCP proxy that cuts every event-stream connection shortly after it starts, as a flaky network does."""

from __future__ import annotations

import asyncio
import contextlib

EVENTS_REQUEST = b"GET /events/"
LAST_EVENT_ID_HEADER = b"\r\nlast-event-id:"


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the service; resets each `/events/` connection after `cut_after` s."""

    def __init__(self, target_port: int, *, cut_after: float = 0.3) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.events_requests: list[bytes] = []
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def resumed_requests(self) -> list[bytes]:
        """Event-stream requests that carried a Last-Event-ID header."""
        return [r for r in self.events_requests if LAST_EVENT_ID_HEADER in r.lower()]

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
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        cut = asyncio.Event()
        tasks = [
            asyncio.create_task(self._pump(client_r, upstream_w, cut, inspect=True)),
            asyncio.create_task(self._pump(upstream_r, client_w, cut, inspect=False)),
            asyncio.create_task(cut.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if cut.is_set():
                self.cuts += 1
                client_w.transport.abort()  # a reset, not a clean end: the browser must retry
                upstream_w.transport.abort()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_w, upstream_w):
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event, *, inspect: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                if inspect and chunk.startswith(EVENTS_REQUEST):
                    self.events_requests.append(chunk)
                    asyncio.get_running_loop().call_later(self.cut_after, cut.set)
                writer.write(chunk)
                await writer.drain()
