"""The HTTP layer under both SDKs: an httpx2 transport over `http1` that hands the raw body to the provider.

The SDKs still build and send each request (env vars, base URL, auth headers,
retries before the first byte, error classes); only the body of a streamed
answer bypasses them, because their per-chunk machinery costs several times
more CPU than the answer's own parsing (figures in ARCHITECTURE.md). The body
is pushed into the provider's parser and the answer's writer from the
connection's `data_received` (`relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2

from . import Finish, ProviderError, Reasoning, Sink, failures
from .http1 import Body, Connection, Pool, ProtocolViolation
from .http1 import Response as Head
from .sse_decoder import SSEDecoder

log = logging.getLogger(__name__)

# Connections this process opens to upstreams at once; each streaming answer holds one.
MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0

_BODY = "chatbot.raw_body"  # response extension that carries the RawBody
# After an answer's normal end, how long its body may take to end (the last chunk, `0\r\n\r\n`, after the
# answer's last event) and keep the connection for the next answer: a TLS handshake saved on its first token.
LINGER_SECONDS = 1.0


class IdleTimeout(TimeoutError):
    """No byte of a response body arrived for the request's read timeout."""


@contextmanager
def _as_httpx_errors(*, connecting: bool) -> Iterator[None]:
    """Failures to reach or hear an upstream as the httpx errors the SDKs retry and classify."""
    try:
        yield
    except TimeoutError as exc:
        raise (httpx2.ConnectTimeout if connecting else httpx2.ReadTimeout)(str(exc) or "timed out") from exc
    except ProtocolViolation as exc:
        raise httpx2.RemoteProtocolError(str(exc)) from exc
    except OSError as exc:  # ConnectionLost, refused, reset, unreachable, a failed TLS handshake
        raise (httpx2.ConnectError if connecting else httpx2.ReadError)(str(exc) or type(exc).__name__) from exc


@dataclass(slots=True)
class _Watched:
    timeout: float  # seconds without a byte before the body fails
    seen: int  # the body's received bytes at the last check that found progress
    since: float  # loop time of that check


class IdleWatch:
    """The idle (read) timeout of every streamed body, kept by one timer instead of one per chunk.

    A timer re-armed on every chunk (as aiohttp's `sock_read` did) was 5.5% of the service's samples at
    10,000 tokens/s (bench/RESULTS.md). This one looks, every tenth of the shortest timeout (at most
    every second), at how many bytes each body has received (`Body.received`). A body that got no byte
    for its timeout fails with IdleTimeout, at most one check late. Each answer's body is consumed as it
    arrives, so a paused socket never looks like a silent upstream for long.
    """

    MAX_INTERVAL = 1.0
    MIN_INTERVAL = 0.01

    def __init__(self) -> None:
        self._bodies: dict[Body, _Watched] = {}
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, body: Body, timeout: float | None) -> None:
        """Watch `body` (seconds without a byte; None or 0: no timeout, nothing to do)."""
        if not timeout:
            return
        loop = asyncio.get_running_loop()
        self._bodies[body] = _Watched(timeout, body.received, loop.time())
        if self._handle is None:
            self._schedule(loop)

    def forget(self, body: Body) -> None:
        self._bodies.pop(body, None)

    def close(self) -> None:
        """Stop watching (the transport closes): a later `watch` starts afresh, on whichever loop runs then."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._bodies.clear()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        shortest = min(w.timeout for w in self._bodies.values())
        interval = min(self.MAX_INTERVAL, max(self.MIN_INTERVAL, shortest / 10))
        self._handle = loop.call_later(interval, self._check)

    def _check(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for body, watched in list(self._bodies.items()):
            if body.done:
                del self._bodies[body]
            elif body.received != watched.seen:
                watched.seen, watched.since = body.received, now
            elif now - watched.since >= watched.timeout:
                del self._bodies[body]
                body.fail(IdleTimeout(f"no byte of the response for {watched.timeout:g}s"))
        if self._bodies:
            self._schedule(loop)


class RawBody(httpx2.AsyncByteStream):
    """A response body for httpx2 (the SDKs read error bodies through it) that also exposes the raw one."""

    def __init__(self, body: Body, headers: list[tuple[bytes, bytes]], idle: IdleWatch) -> None:
        self.body = body
        self.headers = headers
        self._idle = idle
        # A backstop for a body that nobody closes (a cancel that lands between this transport and the
        # provider's `try`): once it is collected, its connection closes and its pool slot frees up. The
        # collector may run in any thread, so the close is handed to the loop.
        self._finalizer = weakref.finalize(self, _close_dropped, asyncio.get_running_loop(), body, idle)
        self._finalizer.atexit = False

    def header(self, name: str) -> str:
        """The first value of header `name` (case-insensitive), decoded as Latin-1; "" if absent."""
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), "")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(connecting=False):
            while chunk := await self.body.read():
                yield chunk

    async def aclose(self, linger: float = 0.0) -> None:
        """Close the body: an unfinished one closes the connection, so the upstream stops generating; with
        `linger` (seconds, for an answer that ended normally) it may finish meanwhile and keep it."""
        self._finalizer.detach()
        self._idle.forget(self.body)
        self.body.close(linger)


def _close_dropped(loop: asyncio.AbstractEventLoop, body: Body, idle: IdleWatch) -> None:
    def close() -> None:
        if not body.released:
            log.warning("an upstream response was dropped without being closed; its connection is closed now")
        idle.forget(body)
        body.close()

    with contextlib.suppress(RuntimeError):  # the loop has closed: so has the connection
        loop.call_soon_threadsafe(close)


_SKIPPED = frozenset({b"accept-encoding", b"connection", b"transfer-encoding", b"content-length", b"keep-alive"})


_UNSAFE = re.compile(rb"[\r\n\0]")


def _request_bytes(request: httpx2.Request, content: bytes) -> bytes:
    """The request's head and body as sent. LocalProtocolError if a header would break the head (a CR, LF or
    NUL, as in an API key read from a file with its line end): the request is not sent."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if _UNSAFE.search(name) or _UNSAFE.search(value):
            log.error("not sending a request whose %r header holds a line break or NUL", name.decode("latin-1"))
            raise httpx2.LocalProtocolError(f"the {name.decode('latin-1')!r} header holds a line break or NUL")
        if name.lower() not in _SKIPPED:
            lines.append(b"%s: %s" % (name, value))
    # The raw body is parsed as it arrives, never inflated.
    lines.append(b"Accept-Encoding: identity")
    if content or request.method not in ("GET", "HEAD"):
        lines.append(b"Content-Length: %d" % len(content))
    return b"\r\n".join(lines) + b"\r\n\r\n" + content


class HttpTransport(httpx2.AsyncBaseTransport):
    """Sends httpx2 requests over this process's own HTTP/1.1 connections (`http1.Pool`)."""

    def __init__(self) -> None:
        self._pool = Pool(limit=MAX_CONNECTIONS, keepalive=KEEPALIVE_SECONDS)
        self.idle = IdleWatch()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"{url.scheme!r} URLs are not supported")
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        head = _request_bytes(request, await request.aread())
        with _as_httpx_errors(connecting=True):
            conn = await self._pool.connection(
                key, pool_timeout=timeout.get("pool"), connect_timeout=timeout.get("connect")
            )
        response = await self._send(conn, head, timeout.get("read"))
        self.idle.watch(response.body, timeout.get("read"))
        body = RawBody(response.body, response.headers, self.idle)
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            stream=body,
            request=request,
            extensions={"http_version": b"HTTP/1.1", _BODY: body},
        )

    @staticmethod
    async def _send(conn: Connection, head: bytes, within: float | None) -> Head:
        """The response's head; the connection is given back if none comes (the body owns it after that)."""
        try:
            with _as_httpx_errors(connecting=False):
                async with asyncio.timeout(within):
                    return await conn.send(head)
        except BaseException:
            conn.release(False)
            raise

    async def aclose(self) -> None:
        self.idle.close()
        self._pool.close()


def take_body(response: httpx2.Response) -> RawBody:
    """The body under a response this transport produced. Closing it (`RawBody.aclose`) closes the answer,
    so a provider need keep nothing else of the SDK's or httpx2's objects while the answer streams."""
    body = response.extensions.get(_BODY)
    if not isinstance(body, RawBody):
        raise TypeError("the response was not produced by HttpTransport")
    return body


FIRST_BYTES = 64  # of a body that is not an event stream, quoted in the error


async def event_stream(raw: RawBody) -> Body:
    """The body of a streamed answer; ProviderError `upstream_bad_response` if it is not `text/event-stream`."""
    content_type = raw.header("Content-Type")
    if content_type.partition(";")[0].strip().lower() == "text/event-stream":
        return raw.body
    first = b""
    try:
        while len(first) < FIRST_BYTES and (chunk := await raw.body.read()):
            first += chunk
    except OSError:
        pass
    log.warning("the upstream answered %s instead of an event stream: %r", content_type or "(none)", first)
    raise failures.not_an_event_stream(content_type, first[:FIRST_BYTES])


class EventParser(Protocol):
    """Turns one provider's event data into answer text, reasoning and the end of the answer."""

    ended: bool  # the model's own finish or stop reason has arrived
    mixed: bool  # `out` of the last take() holds Reasoning items; the relay resets it

    def take(self, events: list[bytes], out: list[str | Reasoning]) -> Finish | None:
        """Append these events' text and reasoning to `out`; the Finish once the protocol's last event came."""
        ...

    def finish(self) -> Finish:
        """The end as known so far: used when the body closes or goes quiet after the model's own end."""
        ...


_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError, OverflowError)
# After the model's own finish or stop reason, how long the body may go on (usage, `[DONE]`, pings).
TAIL_SECONDS = 0.5


async def relay_body(body: Body, parser: EventParser, sink: Sink) -> Finish:
    """The per-chunk hot path: each piece of the body, as it arrives, is split into events, parsed, and its
    text handed to `sink` (a run of one kind joined: one `add` per piece), inside the connection's
    `data_received`; no task wakes up per chunk.

    Returns the Finish: the protocol's last event, or the model's own end followed by the body's end, a
    dropped connection or TAIL_SECONDS of anything else. Raises ProviderError: `upstream_disconnected`
    or `upstream_timeout` (the idle watch) before the model's end, `upstream_bad_response` for an event
    the parser cannot read, the upstream's own error event. Whatever `sink` raises ends the relay and is
    raised here. Text parsed before a failure reaches `sink` before the failure ends the relay.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Finish] = loop.create_future()
    decoder = SSEDecoder()
    tail: list[asyncio.TimerHandle] = []  # the wait after the model's own end, once armed

    def end(result: Finish | BaseException) -> None:
        if done.done():
            return
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def on_data(chunk: bytes) -> None:
        if done.done():
            return
        out: list[str | Reasoning] = []
        try:
            finish = parser.take(decoder.feed(chunk), out)
        except _PARSE_ERRORS as exc:
            log.warning("unreadable event from the upstream: %r", exc)
            failure = failures.failure(failures.BAD_RESPONSE)
            failure.__cause__ = exc
            _deliver(out, parser, sink, end)
            end(failure)
            return
        except ProviderError as exc:
            _deliver(out, parser, sink, end)
            end(exc)
            return
        except BaseException as exc:  # a bug: it ends this answer, never the connection's callbacks
            end(exc)
            return
        if out and not _deliver(out, parser, sink, end):
            return
        if finish is not None:
            end(finish)
        elif parser.ended and not tail:
            tail.append(loop.call_later(TAIL_SECONDS, lambda: end(parser.finish())))

    def on_end(exc: BaseException | None) -> None:
        if parser.ended:
            end(parser.finish())
        elif exc is None:
            end(failures.failure(failures.DISCONNECTED))
        else:
            failure = failures.for_read_error(exc)
            failure.__cause__ = exc
            end(failure)

    body.consume(on_data, on_end)
    try:
        return await done
    finally:
        for handle in tail:
            handle.cancel()
        if not done.done():  # cancelled: the answer is abandoned (the provider closes the body)
            done.cancel()


def _deliver(out: list[str | Reasoning], parser: EventParser, sink: Sink, end: Callable[[BaseException], None]) -> bool:
    """Hand one piece's items to `sink`; False, with the relay ended, if the sink raised."""
    try:
        if not parser.mixed:
            text = out[0] if len(out) == 1 else "".join(out)  # type: ignore[arg-type]
            if text:
                sink.add(text)  # type: ignore[arg-type]
            return True
        for item in _runs(out, parser):
            if type(item) is str:
                sink.add(item)
            else:
                sink.add_reasoning(item.text)  # type: ignore[union-attr]
        return True
    except BaseException as exc:
        end(exc)
        return False


def _runs(out: list[str | Reasoning], parser: EventParser) -> list[str | Reasoning]:
    """Consecutive items of one kind joined: text, then reasoning, then text again stay three items."""
    parser.mixed = False
    runs: list[str | Reasoning] = []
    for item in out:
        last = runs[-1] if runs else None
        if isinstance(item, str):
            if isinstance(last, str):
                runs[-1] = last + item
            elif item:
                runs.append(item)
        elif isinstance(last, Reasoning):
            runs[-1] = Reasoning(last.text + item.text)
        elif item.text:
            runs.append(item)
    return runs


async def items(answer: Callable[[Sink], Awaitable[Finish]]) -> AsyncIterator[str | Reasoning | Finish]:
    """A push-mode answer (`answer(sink)`) as an async iterator: text as str, thinking as Reasoning, then
    the Finish; what the answer raises is raised after the items that came before it. For callers that
    pull (tests, benchmarks); the producer passes its writer as the sink instead."""
    collected = _Collected()
    task = asyncio.ensure_future(answer(collected))
    try:
        while True:
            if not collected.items and not task.done():
                collected.arrived = asyncio.get_running_loop().create_future()
                either: set[asyncio.Future[Any]] = {task, collected.arrived}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            taken, collected.items = collected.items, []
            for item in taken:
                yield item
            if task.done() and not collected.items:
                yield task.result()
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


class _Collected:
    """A sink that keeps what it is given, in order, and says when something arrived."""

    def __init__(self) -> None:
        self.items: list[str | Reasoning] = []
        self.arrived: asyncio.Future[None] | None = None

    def add(self, text: str) -> None:
        self._put(text)

    def add_reasoning(self, text: str) -> None:
        self._put(Reasoning(text))

    def _put(self, item: str | Reasoning) -> None:
        self.items.append(item)
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)
