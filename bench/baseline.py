"""The simplest correct design, as the benchmark's yardstick: one XADD per token, one blocking XREAD per reader.

Same API shape as the service (`POST /sessions`, `GET /events/<id>` with Last-Event-ID) and the same wire
format (`chatbot.events`), so the same load generator drives both. No Lua, no pub/sub, no hub, no
coalescing, no lease: each upstream delta is one XADD, each open stream holds its own Redis connection in
`XREAD BLOCK`. Run by the harness as `python -m bench.baseline --port N --redis URL --upstream URL`.

With `--store memory` it keeps no store at all: each token goes from the upstream's read straight to the
session's readers in this process (an id per token, resumable while the process lives). That is the least a
relay in Python with aiohttp can do between an upstream and a browser, the yardstick of `bench/ttft_floor.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from chatbot import events
from chatbot.eventstream import HEARTBEAT

REDIS = web.AppKey("redis", aioredis.Redis)
HTTP = web.AppKey("http", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
REDIS_URL = web.AppKey("redis_url", str)
TASKS = web.AppKey("tasks", set[asyncio.Task[None]])
MEMORY = web.AppKey("memory", dict)  # --store memory: session id → _Held

TTL_SECONDS = 3600
BLOCK_MS = 15_000  # a reader's XREAD waits this long, then sends a ping comment


def _key(session_id: str) -> str:
    return f"baseline:{session_id}"


async def create(request: web.Request) -> web.Response:
    body = await request.json()
    session_id = secrets.token_urlsafe(16)
    if MEMORY in request.app:
        request.app[MEMORY][session_id] = _Held()  # kept until the process ends
    task = asyncio.create_task(_produce(request.app, session_id, str(body["message"])))
    tasks: set[asyncio.Task[None]] = request.app[TASKS]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return web.json_response({"id": session_id, "events_url": f"/events/{session_id}"}, status=201)


async def _upstream_texts(app: web.Application, message: str) -> AsyncIterator[str]:
    """The upstream's answer: each delta's text as its line arrives."""
    request = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": message}]}
    async with app[HTTP].post(app[UPSTREAM] + "/chat/completions", json=request) as response:
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            choices = json.loads(data).get("choices")
            text = choices[0]["delta"].get("content") if choices else None
            if text:
                yield text


async def _produce(app: web.Application, session_id: str, message: str) -> None:
    if MEMORY in app:
        held = app[MEMORY][session_id]
        async for text in _upstream_texts(app, message):
            held.add(events.TOKEN, events.token_data(text))
        held.add(events.DONE, events.done_data("stop"))
        return
    redis, key = app[REDIS], _key(session_id)
    async for text in _upstream_texts(app, message):
        await redis.xadd(key, {"e": events.TOKEN, "d": events.token_data(text)})
    await redis.xadd(key, {"e": events.DONE, "d": events.done_data("stop")})
    await redis.expire(key, TTL_SECONDS)


class _Held:
    """`--store memory`: one answer's events in this process, and a flag its readers wait on."""

    def __init__(self) -> None:
        self.events: list[events.Event] = []
        self.changed = asyncio.Event()

    def add(self, event: str, data: str) -> None:
        self.events.append(events.Event(f"{len(self.events) + 1}-0", event, data))
        self.changed.set()
        self.changed = asyncio.Event()


async def stream(request: web.Request) -> web.StreamResponse:
    last = request.headers.get("Last-Event-ID") or "0-0"
    held = request.app[MEMORY].get(request.match_info["session_id"]) if MEMORY in request.app else None
    if MEMORY in request.app and held is None:
        raise web.HTTPNotFound()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    await response.write(events.retry_field(1000))
    if held is not None:
        return await _stream_held(held, response, int(last.partition("-")[0]))
    redis, key = request.app[REDIS], _key(request.match_info["session_id"])
    while True:
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] = await redis.xread(  # type: ignore[assignment]
            {key: last}, count=512, block=BLOCK_MS
        )
        if not reply:
            await response.write(HEARTBEAT)
            continue
        out = []
        for entry_id, fields in reply[0][1]:
            event = events.Event(entry_id, fields["e"], fields["d"])
            out.append(events.frame(event))
            last = entry_id
            if event.terminal:
                await response.write(b"".join(out))
                return response
        await response.write(b"".join(out))


async def _stream_held(held: _Held, response: web.StreamResponse, sent: int) -> web.StreamResponse:
    """`--store memory`: the answer's events after the `sent` first, as they come."""
    while True:
        changed = held.changed
        if len(held.events) > sent:
            fresh = held.events[sent:]
            sent += len(fresh)
            await response.write(b"".join(events.frame(event) for event in fresh))
            if fresh[-1].terminal:
                return response
        await changed.wait()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    # No connection cap: every blocked XREAD holds one connection of this pool.
    app[REDIS] = aioredis.Redis.from_url(
        app[REDIS_URL], decode_responses=True, max_connections=1_000_000, socket_timeout=None
    )
    app[HTTP] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app[TASKS] = set()
    yield
    tasks: set[asyncio.Task[None]] = app[TASKS]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app[HTTP].close()
    await app[REDIS].aclose()


def create_app(redis_url: str, upstream: str, store: str = "redis") -> web.Application:
    app = web.Application()
    app[UPSTREAM], app[REDIS_URL] = upstream, redis_url
    if store == "memory":
        app[MEMORY] = {}
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/sessions", create)
    app.router.add_get("/events/{session_id}", stream)
    app.router.add_get("/readyz", _ready)
    return app


async def _ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--upstream", required=True, help="the OpenAI base URL, ending in /v1")
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    args = parser.parse_args()
    app = create_app(args.redis, args.upstream, args.store)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
