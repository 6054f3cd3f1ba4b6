"""GET /events/<id>: the buffer, then the live tail, as Server-Sent Events, resumable by event id."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from redis.exceptions import RedisError

from . import events
from .appkeys import CAPS, HUB, METRICS, SETTINGS, STORE
from .events import Event
from .hub import StreamClosed, Subscriber
from .limits import client_address
from .metrics import Metrics
from .problems import Problem
from .sessions import not_found, session_id

log = logging.getLogger(__name__)

SEND_TIMEOUT = 30.0  # seconds a write may wait on a client that stopped reading


def _resume_point(request: web.Request) -> str | None:
    """The id to resume after: the header (set by a reconnecting EventSource) wins over the query."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or None
    if raw is not None:
        try:
            events.parse_event_id(raw)
        except events.BadEventId:
            raise Problem(
                400,
                "invalid-last-event-id",
                "Bad Request",
                "Last-Event-ID must be an event id such as 1700000000000-0.",
            ) from None
    return raw


async def stream(request: web.Request) -> web.StreamResponse:
    sid = session_id(request)
    resume = _resume_point(request)
    if await request.app[STORE].session(sid) is None:
        raise not_found()
    address = client_address(request, request.app[SETTINGS].trusted_proxies)
    try:
        with request.app[CAPS].hold(address):
            return await _serve(request, sid, resume)
    except StreamClosed:
        raise Problem(
            503, "draining", "Service Unavailable", "This instance is shutting down; reconnect.",
            headers={"Retry-After": "1", "Connection": "close"},
        ) from None  # fmt: skip


async def _serve(request: web.Request, sid: str, resume: str | None) -> web.StreamResponse:
    store, hub = request.app[STORE], request.app[HUB]
    after = events.parse_event_id(resume) if resume else (0, 0)
    async with hub.subscribe(sid, after) as sub:
        backlog = await store.read_from(sid, resume or "-")
        if resume is not None:
            if not backlog or backlog[0].id != resume:
                raise Problem(
                    409, "unknown-last-event-id", "Conflict",
                    "Last-Event-ID is not an event of this session; read it again from the start.",
                )  # fmt: skip
            if backlog[0].terminal:
                return web.Response(status=204)  # nothing follows; a native EventSource stops here
            backlog = backlog[1:]
        return await _respond(request, hub_sub=sub, backlog=backlog, resume=resume)


async def _respond(
    request: web.Request, *, hub_sub: Subscriber, backlog: list[Event], resume: str | None
) -> web.StreamResponse:
    settings, store, hub = request.app[SETTINGS], request.app[STORE], request.app[HUB]
    response = EventSourceResponse(ping_interval=settings.heartbeat_seconds, send_timeout=SEND_TIMEOUT)
    await response.prepare(request)
    # A dead peer is noticed by the ping task failing; it ends this reader too.
    watcher = asyncio.create_task(response.wait())
    watcher.add_done_callback(lambda _: _hang_up(hub_sub))
    try:
        await _write(response, events.retry_field(settings.sse_retry_ms))
        last = resume or "0-0"
        batch = [(event, events.frame(event)) for event in backlog]
        while True:
            if batch:
                ended = await _send(response, batch, request.app[METRICS])
                last = batch[-1][0].id
                hub_sub.last_id = max(hub_sub.last_id, events.parse_event_id(last))
                if ended:
                    break
            hub.caught_up(hub_sub, last)
            batch = await hub.next_batch(hub_sub)
            if not batch:  # the reader fell behind the hub's queue: read the rest from the stream
                batch = [(e, events.frame(e)) for e in await store.read_from(hub_sub.session_id, "(" + last)]
    except StreamClosed:
        # Shutting down, or the client went away: end without a terminal event so that it reconnects,
        # and close the connection so that a proxy cannot reuse it to reach this instance again.
        response.force_close()
    except (ConnectionResetError, TimeoutError):
        log.debug("session %s: reader went away", hub_sub.session_id)
    except RedisError as exc:
        # Headers are sent, so no problem document can follow: end the stream, the client resumes.
        log.warning("session %s: store failed mid-stream (%s); ending it for a reconnect", hub_sub.session_id, exc)
        response.force_close()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        response.stop_streaming()
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response


def _hang_up(sub: Subscriber) -> None:
    sub.closed = True
    sub.wake.set()


async def _send(response: EventSourceResponse, batch: list[tuple[Event, bytes]], metrics: Metrics) -> bool:
    """Write events up to and including a terminal one; True if the stream ended."""
    for index, (event, _) in enumerate(batch):
        if event.terminal:
            await _write(response, b"".join(framed for _, framed in batch[: index + 1]))
            metrics.events_sent.inc(index + 1)
            return True
    await _write(response, b"".join(framed for _, framed in batch))
    metrics.events_sent.inc(len(batch))
    return False


async def _write(response: EventSourceResponse, data: bytes) -> None:
    async with asyncio.timeout(SEND_TIMEOUT):
        await response.write(data)
