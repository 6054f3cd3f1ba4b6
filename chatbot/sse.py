"""GET /events/<id>: the buffer, then the live tail, as Server-Sent Events, resumable by event id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from aiohttp import web
from redis.exceptions import RedisError

from . import events
from .appkeys import CAPS, HUB, METRICS, SETTINGS, STORE
from .events import Event
from .eventstream import HEADERS, EventStream
from .hub import StreamClosed
from .limits import StreamCapReached, client_address
from .metrics import Metrics
from .problems import Problem
from .sessions import not_found, session_id
from .store import StoreUnavailable

log = logging.getLogger(__name__)

SEND_TIMEOUT = 30.0  # seconds a write may wait on a client that stopped reading
STORE_RETRY_SECONDS = 1.0  # the Retry-After a store outage would have had
DRAIN_RETRY_SECONDS = 1.0
RETRY_JITTER = 0.5  # retry: is the wait times a random factor in [1, 1.5], so clients do not come back at once


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
    """GET (and HEAD) /events/<id>.

    Final answers keep their status: 404 unknown session, 400 malformed Last-Event-ID, 409 an id that is
    not this session's, 204 when the id is the terminal event. A condition that passes (store outage,
    stream caps, a draining instance) is answered 200 with only `retry:`, so that an EventSource, for
    which any other status is final, comes back by itself with its Last-Event-ID.
    """
    sid = session_id(request)
    resume = _resume_point(request)
    try:
        # A session produced here is joined at once and its metadata read with its backlog, in one round trip
        # (a reader's usual case, and a burst's: bench/RESULTS.md). Any other is looked up first, so that an
        # unknown id costs no subscription to its notices.
        checked = not (request.method == "GET" and request.app[STORE].producing(sid))
        if checked:
            terminal_id = await _terminal_id(request, sid)  # the session's metadata is not kept for the stream
            if request.method == "HEAD":  # the headers a GET would get, without taking a slot or reading
                return _head(resume, terminal_id)
        address = client_address(request, request.app[SETTINGS].trusted_proxies)
        caps = request.app[CAPS]
        caps.take(address)
        try:
            return await _serve(request, sid, resume, checked=checked)
        finally:
            caps.give_back(address)
    except StreamCapReached as cap:
        return _come_back(request, cap.limit, cap.retry_after)
    except StreamClosed:
        return _come_back(request, "draining", DRAIN_RETRY_SECONDS, close=True)
    except ConnectionResetError:
        raise  # the client left: problems.middleware counts it
    except (StoreUnavailable, RedisError, OSError, TimeoutError) as exc:
        request.app[METRICS].redis_errors.labels("events").inc()
        log.warning("session %s: store unavailable before the stream started (%s); client told to retry", sid, exc)
        return _come_back(request, "store_unavailable", STORE_RETRY_SECONDS)


async def _terminal_id(request: web.Request, sid: str) -> str | None:
    """The id of the session's terminal event, None while it runs; 404 for an unknown session."""
    meta = await request.app[STORE].session(sid)
    if meta is None:
        raise not_found()
    return meta.terminal_id


def _head(resume: str | None, terminal_id: str | None) -> web.StreamResponse:
    if resume is not None and resume == terminal_id:
        return web.Response(status=204)
    response = web.StreamResponse(status=200, headers=HEADERS)
    response.enable_chunked_encoding()
    return response


def _come_back(request: web.Request, reason: str, wait_seconds: float, *, close: bool = False) -> web.Response:
    """200 `text/event-stream` with a comment naming `reason` and `retry:` (the wait, with jitter), then the end."""
    request.app[METRICS].retry_answers.labels(reason).inc()
    retry_ms = round(wait_seconds * 1000 * random.uniform(1.0, 1.0 + RETRY_JITTER))
    response = web.Response(status=200, body=events.comment(reason) + events.retry_field(retry_ms), headers=HEADERS)
    if close:  # a proxy must not reuse this connection to reach a draining instance
        response.force_close()
    return response


async def _serve(request: web.Request, sid: str, resume: str | None, *, checked: bool) -> web.StreamResponse:
    """The backlog after `resume`, then live events, until the terminal one or the client leaves.

    `checked`: the session is known to exist; otherwise its metadata is read with the backlog (404 if none).

    One coroutine for the stream's whole life, and no context manager or waiter coroutine of its own:
    each frame an idle stream keeps costs memory per open stream (bench/RESULTS.md).
    """
    settings, store, hub, metrics = request.app[SETTINGS], request.app[STORE], request.app[HUB], request.app[METRICS]
    hub_sub = await hub.join(sid, events.parse_event_id(resume) if resume else (0, 0))
    started = False
    try:
        if checked:
            backlog = await store.read_from(sid, resume or "-")
        else:
            meta, backlog = await store.session_and_read(sid, resume or "-")
            if meta is None:
                raise not_found()
            del meta  # the record (the visitor's message with it) is not kept for the stream's life
        if resume is not None:
            if not backlog or backlog[0].id != resume:
                raise Problem(
                    409, "unknown-last-event-id", "Conflict",
                    "Last-Event-ID is not an event of this session; read it again from the start.",
                )  # fmt: skip
            if backlog[0].terminal:
                return web.Response(status=204)  # nothing follows; a native EventSource stops here
            backlog = backlog[1:]
        response = EventStream(heartbeats=hub.heartbeats, send_timeout=SEND_TIMEOUT)
        await response.prepare(request)  # ClientGone if the client already left
        started = True
    finally:
        if not started:  # answered otherwise (204, 409), or failed before the stream began
            await hub.leave(hub_sub)
    # A dead peer is noticed by a heartbeat; it ends this reader too.
    response.on_gone(hub_sub.wake_to_close)
    try:
        await response.send(events.retry_field(settings.sse_retry_ms))
        last = resume or "0-0"
        batch = [(event, events.frame(event)) for event in backlog]
        del backlog
        events_sent = metrics.events_sent

        def direct(data: bytes, count: int) -> bool:
            if not response.send_now(data):
                return False
            events_sent.inc(count)
            return True

        while True:
            if batch:
                ended = await _send(response, batch, metrics)
                last = batch[-1][0].id
                hub_sub.last_id = max(hub_sub.last_id, events.entry_key(last))
                if ended:
                    break
            hub.caught_up(hub_sub, last)
            # While this handler waits with nothing queued, the hub writes live entries itself (`direct`);
            # it is off whenever the handler writes or reads, so writes keep the stream's order.
            while (taken := hub.take(hub_sub)) is None:
                hub_sub.direct = direct
                hub_sub.waiter = asyncio.get_running_loop().create_future()
                try:
                    await hub_sub.waiter
                finally:
                    hub_sub.direct = hub_sub.waiter = None
            batch = taken
            if hub_sub.last_sent and events.entry_key(hub_sub.last_sent) > events.entry_key(last):
                last = hub_sub.last_sent
            if not batch:  # the reader fell behind the hub's queue: read the rest from the stream
                batch = [(e, events.frame(e)) for e in await store.read_from(hub_sub.session_id, "(" + last)]
    except StreamClosed:
        if _peer_gone(request):
            _client_left(metrics, hub_sub.session_id)
        # Shutting down, or the client went away: end without a terminal event so that it reconnects,
        # and close the connection so that a proxy cannot reuse it to reach this instance again.
        response.force_close()
    except (ConnectionResetError, TimeoutError):
        _client_left(metrics, hub_sub.session_id)
    except (StoreUnavailable, RedisError, OSError) as exc:
        # Headers are sent, so no problem document can follow: end the stream, the client resumes.
        log.warning("session %s: store failed mid-stream (%s); ending it for a reconnect", hub_sub.session_id, exc)
        response.force_close()
    finally:
        await response.stop()
        await hub.leave(hub_sub)
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response


def _peer_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _client_left(metrics: Metrics, session_id: str) -> None:
    metrics.client_disconnects.labels("mid_stream").inc()
    log.debug("session %s: reader went away", session_id)


async def _send(response: EventStream, batch: list[tuple[Event, bytes]], metrics: Metrics) -> bool:
    """Write events up to and including a terminal one; True if the stream ended."""
    for index, (event, _) in enumerate(batch):
        if event.terminal:
            await response.send(b"".join(framed for _, framed in batch[: index + 1]))
            metrics.events_sent.inc(index + 1)
            return True
    await response.send(b"".join(framed for _, framed in batch))
    metrics.events_sent.inc(len(batch))
    return False
