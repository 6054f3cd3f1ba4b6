"""Fake OpenAI and Anthropic upstreams on 127.0.0.1: the exact wire formats, scripted per request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted answer: a status, then body pieces written one TCP write each, then how it ends."""

    pieces: Sequence[bytes] = ()
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0  # seconds between pieces
    then: str = "end"  # "end": finish the body; "drop": cut the connection; "stall": send nothing more
    forever: bytes = b""  # if set, after the pieces write this every `pause` seconds until the client leaves
    every: float = 0.0  # the interval of `forever` instead of `pause`, if set


class FakeUpstream:
    """Serves scripted replies (the last one repeats) and records what it received and when clients left."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._serve)
        app.router.add_post("/v1/messages", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if reply.status != 200:
            body = b"".join(reply.pieces) or b'{"error": {"type": "error", "message": "scripted"}}'
            return web.Response(status=reply.status, body=body, headers=reply.headers, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await response.prepare(request)
        try:
            for piece in reply.pieces:
                await response.write(piece)
                if reply.pause:
                    await asyncio.sleep(reply.pause)
            while reply.forever:
                await response.write(reply.forever)
                await asyncio.sleep(reply.every or reply.pause)
            if reply.then == "drop":
                assert request.transport is not None
                request.transport.abort()
            elif reply.then == "stall":
                await self._until_gone(request)
            else:
                await response.write_eof()
        except ConnectionError:
            self.disconnected.set()
        return response

    async def _until_gone(self, request: web.Request) -> None:
        """Sends nothing; notices the client leaving (aiohttp does not cancel handlers by default)."""
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.disconnected.set()


def openai_events(
    deltas: Sequence[str], *, finish_reason: str = "stop", usage: tuple[int, int] | None = (7, 11)
) -> list[bytes]:
    """A Chat Completions stream: a role chunk, one chunk per delta, the finish, usage, `[DONE]`."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "fake-model",
            "system_fingerprint": "fp_1",
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [chunk(choice({"role": "assistant", "content": ""}), usage=None)]
    events += [chunk(choice({"content": d}), usage=None) for d in deltas]
    events.append(chunk(choice({}, finish_reason), usage=None))
    if usage is not None:
        events.append(
            chunk([], usage={"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)})
        )
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_events(
    deltas: Sequence[str], *, stop_reason: str = "end_turn", usage: tuple[int, int] = (7, 11)
) -> list[bytes]:
    """A Messages stream: message_start, a text block of deltas, message_delta, message_stop."""

    def event(kind: str, body: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **body}).encode() + b"\n\n"

    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "fake-model",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": 1},
    }
    events = [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {}),
    ]
    events += [event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d}}) for d in deltas]
    events += [
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta",
            {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": usage[1]}},
        ),
        event("message_stop", {}),
    ]
    return events


def split_bytes(pieces: Sequence[bytes], size: int) -> list[bytes]:
    """The same bytes cut every `size` bytes, whatever they cut: lines, UTF-8 characters."""
    raw = b"".join(pieces)
    return [raw[i : i + size] for i in range(0, len(raw), size)]
