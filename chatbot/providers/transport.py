"""The HTTP layer under both SDKs: an httpx2 transport over aiohttp that hands the raw body to the provider.

The SDKs still build and send each request (env vars, base URL, auth headers,
retries before the first byte, error classes); only the body of a streamed
answer bypasses them, because their per-chunk machinery costs several times
more CPU than the answer's own parsing (figures in ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Protocol

import aiohttp
import httpx2

from . import Finish, failures
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


class RawBody(httpx2.AsyncByteStream):
    """A response body that also exposes aiohttp's reader, for the provider's own SSE parsing."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.content = response.content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # An unfinished body means an abandoned answer: drop the connection so the upstream stops generating.
        if self.content.at_eof():
            self.response.release()
        else:
            self.response.close()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """Sends httpx2 requests with one aiohttp session, opened on first use inside the event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

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
        body = RawBody(response)
        return httpx2.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=body,
            request=request,
            extensions={"http_version": b"HTTP/1.1", _BODY: body},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def raw_body(response: httpx2.Response) -> aiohttp.StreamReader:
    """The aiohttp reader under a response this transport produced (httpx2 wraps the stream, not extensions)."""
    body = response.extensions.get(_BODY)
    if not isinstance(body, RawBody):
        raise TypeError("the response was not produced by AiohttpTransport")
    return body.content


class EventParser(Protocol):
    def take(self, events: list[bytes], texts: list[str]) -> Finish | None:
        """Append the text of these events' data to `texts`; the Finish if one ends the answer."""
        ...


_READ_ERRORS = (aiohttp.ClientError, OSError)
_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


async def relay_body(body: aiohttp.StreamReader, parser: EventParser) -> AsyncIterator[str | Finish]:
    """The per-chunk hot path: one read, one split, one json.loads per event, at most one yield per read.

    A body that ends without the protocol's last event is a lost connection.
    Text parsed before a failure is yielded before the failure is raised.
    """
    decoder = SSEDecoder()
    while True:
        try:
            chunk = await body.readany()
        except _READ_ERRORS as exc:
            raise failures.for_read_error(exc) from exc
        if not chunk:
            raise failures.failure(failures.DISCONNECTED)
        texts: list[str] = []
        try:
            finish = parser.take(decoder.feed(chunk), texts)
        except _PARSE_ERRORS as exc:
            log.warning("unreadable event from the upstream: %r", exc)
            if texts:
                yield "".join(texts)
            raise failures.failure(failures.BAD_RESPONSE) from exc
        except Exception:
            if texts:
                yield "".join(texts)
            raise
        if texts:
            yield texts[0] if len(texts) == 1 else "".join(texts)
        if finish is not None:
            yield finish
            return
