"""The HTTP layer under both SDKs: an httpx2 transport over aiohttp that hands the raw body to the provider.

The SDKs still build and send each request (env vars, base URL, auth headers,
retries before the first byte, error classes); only the body of a streamed
answer bypasses them, because their per-chunk machinery costs several times
more CPU than the answer's own parsing (figures in ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx2

from . import Finish, ProviderError, Reasoning, failures
from .sse_decoder import SSEDecoder

log = logging.getLogger(__name__)

# Connections this process opens to upstreams at once; each streaming answer holds one.
MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0

_BODY = "chatbot.raw_body"  # response extension that carries the RawBody

_TIMEOUTS: tuple[tuple[type[Exception], type[httpx2.TransportError]], ...] = (
    (aiohttp.ServerTimeoutError, httpx2.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx2.ConnectError),
    (aiohttp.ClientPayloadError, httpx2.ReadError),
    (aiohttp.ClientError, httpx2.NetworkError),
    (TimeoutError, httpx2.TimeoutException),
    (OSError, httpx2.NetworkError),
)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """aiohttp failures as the httpx errors the SDKs retry and classify."""
    try:
        yield
    except tuple(aio for aio, _ in _TIMEOUTS) as exc:
        mapped = next(hx for aio, hx in _TIMEOUTS if isinstance(exc, aio))
        raise mapped(str(exc) or type(exc).__name__) from exc


@dataclass(slots=True)
class _Watched:
    timeout: float  # seconds without a byte before the body fails
    seen: int  # the body's received bytes at the last check that found progress
    since: float  # loop time of that check


class IdleWatch:
    """The idle (read) timeout of every streamed body, kept by one timer instead of one per chunk.

    aiohttp re-arms a timer on every read of a body (`sock_read`): for a relay that receives one small
    chunk per token, that was 5.5% of the service's samples at 10,000 tokens/s (bench/RESULTS.md). Once a
    response's headers are in, its own timer is turned off (`ResponseHandler.read_timeout`; it still
    guards the wait for the headers) and this one looks, every tenth of the shortest timeout (at most
    every second), at how many bytes each body has received (`StreamReader.total_bytes`). A body that got
    no byte for its timeout fails with aiohttp's own `ServerTimeoutError`, as `sock_read` would have, at
    most one check late. Each answer's body is read as it arrives, so a full buffer (aiohttp stops reading
    the socket) never looks like a silent upstream for long.
    """

    MAX_INTERVAL = 1.0
    MIN_INTERVAL = 0.01

    def __init__(self) -> None:
        self._bodies: dict[aiohttp.StreamReader, _Watched] = {}
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, response: aiohttp.ClientResponse, timeout: float | None) -> None:
        """Take over `response`'s body timeout (seconds; None or 0: no timeout, nothing to do)."""
        connection = response.connection
        if not timeout or connection is None or connection.protocol is None:
            return
        connection.protocol.read_timeout = None  # its next read cancels the timer armed by the last one
        loop = asyncio.get_running_loop()
        body = response.content
        self._bodies[body] = _Watched(timeout, body.total_bytes, loop.time())
        if self._handle is None:
            self._schedule(loop)

    def forget(self, body: aiohttp.StreamReader) -> None:
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
            if body.at_eof() or body.exception() is not None:
                del self._bodies[body]
            elif body.total_bytes != watched.seen:
                watched.seen, watched.since = body.total_bytes, now
            elif now - watched.since >= watched.timeout:
                del self._bodies[body]
                body.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
        if self._bodies:
            self._schedule(loop)


class RawBody(httpx2.AsyncByteStream):
    """A response body that also exposes aiohttp's reader, for the provider's own SSE parsing."""

    def __init__(self, response: aiohttp.ClientResponse, idle: IdleWatch) -> None:
        self.response = response
        self.content = response.content
        self._idle = idle

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._idle.forget(self.content)
        # An unfinished body means an abandoned answer: drop the connection so the upstream stops generating.
        if self.content.at_eof():
            self.response.release()
        else:
            self.response.close()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """Sends httpx2 requests with one aiohttp session, opened on first use inside the event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.idle = IdleWatch()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS)
            # trust_env=False: with it aiohttp looks up ~/.netrc in a worker thread before every request
            # (bench/RESULTS.md, TTFT profile); the SDK already ignores proxy variables (trust_env=False).
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeout = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "accept-encoding"]
        headers.append(("Accept-Encoding", "identity"))  # the raw body is parsed as it arrives, never inflated
        with _as_httpx_errors():
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=headers,
                data=await request.aread() or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        self.idle.watch(response, timeout.get("read"))
        body = RawBody(response, self.idle)
        return httpx2.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=body,
            request=request,
            extensions={"http_version": b"HTTP/1.1", _BODY: body},
        )

    async def aclose(self) -> None:
        self.idle.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def take_body(response: httpx2.Response) -> RawBody:
    """The body under a response this transport produced. Closing it (`RawBody.aclose`) closes the answer,
    so a provider need keep nothing else of the SDK's or httpx2's objects while the answer streams."""
    body = response.extensions.get(_BODY)
    if not isinstance(body, RawBody):
        raise TypeError("the response was not produced by AiohttpTransport")
    return body


FIRST_BYTES = 64  # of a body that is not an event stream, quoted in the error


async def event_stream(body: RawBody) -> aiohttp.StreamReader:
    """The reader of a streamed answer; ProviderError `upstream_bad_response` if it is not `text/event-stream`."""
    content_type = body.response.headers.get("Content-Type", "")
    if content_type.partition(";")[0].strip().lower() == "text/event-stream":
        return body.content
    try:
        first = await body.content.read(FIRST_BYTES)
    except _READ_ERRORS:
        first = b""
    log.warning("the upstream answered %s instead of an event stream: %r", content_type or "(none)", first)
    raise failures.not_an_event_stream(content_type, first)


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


_READ_ERRORS = (aiohttp.ClientError, OSError)
_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError, OverflowError)
# After the model's own finish or stop reason, how long the body may go on (usage, `[DONE]`, pings).
TAIL_SECONDS = 0.5


async def relay_body(body: aiohttp.StreamReader, parser: EventParser) -> AsyncIterator[str | Reasoning | Finish]:
    """The per-chunk hot path: one read, one split, one json.loads per event, at most one yield per read.

    Yields answer text as str and thinking as Reasoning (a run of each kind joined), then one Finish.
    Once the model's own end has arrived, a body that closes, drops or keeps talking past TAIL_SECONDS
    ends the answer normally; before it, a body that ends is a lost connection.
    Text parsed before a failure is yielded before the failure is raised.
    """
    decoder = SSEDecoder()
    while True:
        try:
            if parser.ended:
                async with asyncio.timeout(TAIL_SECONDS):
                    chunk = await body.readany()
            else:
                chunk = await body.readany()
        except TimeoutError:
            if not parser.ended:
                raise failures.for_read_error(TimeoutError()) from None
            chunk = b""
        except _READ_ERRORS as exc:
            if not parser.ended:
                raise failures.for_read_error(exc) from exc
            chunk = b""
        if not chunk:
            if parser.ended:
                yield parser.finish()
                return
            raise failures.failure(failures.DISCONNECTED)
        out: list[str | Reasoning] = []
        try:
            finish = parser.take(decoder.feed(chunk), out)
        except _PARSE_ERRORS as exc:
            log.warning("unreadable event from the upstream: %r", exc)
            for item in _runs(out, parser):
                yield item
            raise failures.failure(failures.BAD_RESPONSE) from exc
        except ProviderError:
            for item in _runs(out, parser):
                yield item
            raise
        if out:
            if parser.mixed:
                for item in _runs(out, parser):
                    yield item
            else:
                yield out[0] if len(out) == 1 else "".join(out)  # type: ignore[arg-type]
        if finish is not None:
            yield finish
            return


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
