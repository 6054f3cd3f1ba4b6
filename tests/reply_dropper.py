"""A TCP proxy in front of a real redis-server that can lose replies: the command runs, its answer never comes.

This is what a client sees when Redis dies, or the connection drops, after a command ran but before its reply
reached the client (with an append-only file the write survives the restart). The client can only send the
command again, so whatever it sends must be safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib


class ReplyDropper:
    """Forwards bytes both ways; `drop(marker, times)` loses the replies of the next `times` commands whose
    bytes contain `marker` (say, a script's SHA1): each is sent to Redis, and once Redis has answered, the
    client's connection is cut with the answer unread. Every other command and reply passes untouched."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.dropped: dict[bytes, int] = {}  # marker → replies lost so far
        self._armed: dict[bytes, int] = {}  # marker → replies still to lose
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop(self, marker: bytes, times: int = 1) -> None:
        self._armed[marker] = self._armed.get(marker, 0) + times
        self.dropped.setdefault(marker, 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        redis_w: asyncio.StreamWriter | None = None
        pumps: list[asyncio.Task[None]] = []
        try:
            try:
                redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
            except OSError:
                return
            doomed = asyncio.Event()  # a command whose reply must be lost went up this connection
            pumps = [
                asyncio.create_task(self._up(client_r, redis_w, doomed)),
                asyncio.create_task(self._down(redis_r, client_w, doomed)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Both sockets are dropped before the first await here, so a cancel mid-cleanup leaks neither.
            for writer in (client_w, redis_w):
                if writer is not None:
                    writer.transport.abort()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.discard(task)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: asyncio.Event) -> None:
        while data := await reader.read(65536):
            for marker, times in self._armed.items():
                if times and marker in data:
                    self._armed[marker] -= 1
                    self.dropped[marker] += 1
                    doomed.set()
            writer.write(data)
            await writer.drain()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: asyncio.Event) -> None:
        while data := await reader.read(65536):
            if doomed.is_set():
                return  # Redis answered, so the command ran; the answer is lost with the connection
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
