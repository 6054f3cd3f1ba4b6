"""A paced fake OpenAI-compatible upstream, run as its own process: `python -m bench.upstream --port N`.

The user message of each Chat Completions request is a JSON script (`Script`): how many tokens, at what
rate, after what first-token delay. Token `i` is scheduled at `start + delay + i / rate` on the shared
CLOCK_MONOTONIC, whatever the consumer does (open loop: nothing waits for the service, so there is no
coordinated omission), and carries the time it was written (`"<i>:<ns> "`), which a client subtracts from
the time it reads the token. How late the fake itself wrote (its timers, its shared core) is kept apart
and reported (`/control/stats`), so that a saturated load generator is seen, not blamed on the service.

A raw asyncio protocol (chunked HTTP/1.1, keep-alive) instead of aiohttp's server keeps the load
generator's CPU per token to one `transport.write`, so the core it shares with the client lasts longer.
`POST /control/release` ends every answer now, whether held (`hold`: after its tokens, nothing until
released) or still sending, which is how the open-streams scenario lets 10,000 streams go.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

NS = 1_000_000_000
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Cache-Control: no-cache\r\n\r\n"
)
DONE = (
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


@dataclass(frozen=True, slots=True)
class Script:
    """What one request asks the fake to send."""

    tokens: int = 10
    rate: float = 50.0  # tokens per second
    delay: float = 0.0  # seconds before the first token
    hold: bool = False  # after the tokens, keep the answer open until /control/release

    def message(self) -> str:
        return json.dumps({"tokens": self.tokens, "rate": self.rate, "delay": self.delay, "hold": self.hold})

    @classmethod
    def parse(cls, raw: str) -> Script:
        try:
            fields: dict[str, Any] = json.loads(raw)
        except ValueError:
            return cls()
        return cls(**fields)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_event(seq: int, sent_ns: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%d:%d "},"finish_reason":null}]}\n\n' % (
        seq,
        sent_ns,
    )


def parse_tokens(text: str) -> list[tuple[int, int]]:
    """The (sequence number, sent ns) pairs in a piece of relayed text."""
    out = []
    for item in text.split():
        seq, _, ns = item.partition(":")
        out.append((int(seq), int(ns)))
    return out


class _Answer:
    """One streamed answer on one connection, paced by loop timers (a plain callback per token)."""

    def __init__(self, conn: _Conn, script: Script) -> None:
        self.conn = conn
        self.script = script
        self.loop = asyncio.get_running_loop()
        self.start = time.monotonic() + script.delay  # uvloop's loop.time() has millisecond resolution
        self.seq = 0
        self.handle: asyncio.TimerHandle | None = None
        conn.server.answers.add(self)
        conn.transport.write(HEAD)
        self._schedule()

    def _schedule(self) -> None:
        if self.seq < self.script.tokens:
            due = self.start + self.seq / self.script.rate
            self.handle = self.loop.call_later(max(0.0, due - time.monotonic()), self._send)
        elif not self.script.hold:
            self.finish()

    def _send(self) -> None:
        if self.conn.transport.is_closing():
            return
        now_ns = time.monotonic_ns()
        self.conn.server.lateness.append(now_ns - int((self.start + self.seq / self.script.rate) * NS))
        self.conn.transport.write(chunk(token_event(self.seq, now_ns)))
        self.seq += 1
        self._schedule()

    def finish(self) -> None:
        self.cancel()
        if not self.conn.transport.is_closing():
            self.conn.transport.write(chunk(DONE) + b"0\r\n\r\n")
        self.conn.answer = None
        self.conn.serve_next()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.conn.server.answers.discard(self)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: requests one after the other, as aiohttp's client sends them."""

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buffer = b""
        self.answer: _Answer | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.serve_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None:
            self.answer.cancel()

    def serve_next(self) -> None:
        if self.answer is not None:
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        body = self.buffer[head_end + 4 : head_end + 4 + length]
        self.buffer = self.buffer[head_end + 4 + length :]
        path = head.split(" ", 2)[1]
        if path.startswith("/control/"):
            reply = json.dumps(self.server.control(path)).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(reply), reply)
            )
            self.serve_next()
            return
        request = json.loads(body)
        self.answer = _Answer(self, Script.parse(request["messages"][-1]["content"]))


class Upstream:
    """The server: every connection and every held answer."""

    def __init__(self) -> None:
        self.answers: set[_Answer] = set()  # sending or held
        self.lateness: list[int] = []  # ns each token was written after its scheduled time

    def control(self, path: str) -> dict[str, Any]:
        if path == "/control/release":
            released = list(self.answers)
            for answer in released:
                answer.finish()
            return {"released": len(released)}
        late, self.lateness = sorted(self.lateness), []  # /control/stats: since the last call
        if not late:
            return {"tokens": 0, "late_p50_ms": 0.0, "late_p99_ms": 0.0}
        return {
            "tokens": len(late),
            "late_p50_ms": late[len(late) // 2] / 1e6,
            "late_p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))] / 1e6,
        }


async def serve(port: int) -> None:
    server = Upstream()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _Conn(server), "127.0.0.1", port, backlog=4096)
    print(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}", flush=True)
    await loop.run_in_executor(None, _wait_stdin)


def _wait_stdin() -> None:
    import sys

    sys.stdin.read()  # the harness closes our stdin to stop us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
