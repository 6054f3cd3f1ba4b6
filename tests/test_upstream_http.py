"""The upstream's HTTP/1.1, byte by byte: framings, connection reuse, broken responses, TLS, the pool's limit.

A raw loopback server answers each request with scripted bytes, written in the
pieces given (so a chunk's size line, its CRLF or a header can be cut by a
read); the real app with the real OpenAI SDK relays the answer, and the tests
check what a reader of `/events/` gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import pytest_asyncio
import trustme
import uvloop
from aiohttp.test_utils import TestClient, TestServer

from chatbot.app import create_app
from chatbot.providers.http1 import Pool
from chatbot.providers.transport import HttpTransport, take_body
from tests.conftest import make_settings
from tests.helpers import create_session, text_of, wait_terminal

pytestmark = pytest.mark.timeout(30)
Client = TestClient[Any, Any]

WORDS = ["Hé", "llo ", "wörld", " 😀", "!"]
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def sse_events(words: list[str] = WORDS) -> list[bytes]:
    """Chat Completions chunks for `words`, then the finish reason, usage and [DONE]: each a whole SSE event."""
    delta = b'data: {"choices":[{"index":0,"delta":{"content":%s}}]}\n\n'
    out = [delta % json.dumps(w, ensure_ascii=False).encode() for w in words]  # UTF-8 on the wire, unescaped
    out.append(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n')
    out.append(b"data: [DONE]\n\n")
    return out


def chunked(events: list[bytes], ext: bytes = b"") -> list[bytes]:
    return [b"%x%s\r\n%s\r\n" % (len(e), ext, e) for e in events] + [b"0\r\n\r\n"]


CLOSE = object()  # in a reply: close the connection here


@dataclass
class RawUpstream:
    """Reads each request whole, then writes the next scripted reply: bytes, pauses (float s), CLOSE."""

    replies: list[list[Any]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    context: ssl.SSLContext | None = None
    url: str = ""
    _server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.context else 'http'}://{'localhost' if self.context else '127.0.0.1'}:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.replies.pop(0):
                    if piece is CLOSE:
                        return
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                    else:
                        writer.write(piece)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()


def split(data: bytes, *cuts: int) -> list[bytes]:
    """`data` cut at these offsets, each piece a write of its own with a pause after it."""
    out: list[Any] = []
    at = 0
    for cut in [*cuts, len(data)]:
        out += [data[at:cut], 0.01]
        at = cut
    return out


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@contextlib.asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """Starts apps whose OpenAI provider talks to an upstream; closes them at the end."""
    clients: list[Client] = []

    async def start(upstream: RawUpstream, *, retries: int = 0, key: str = "sk-test") -> Client:
        monkeypatch.setenv("OPENAI_BASE_URL", upstream.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", key)
        settings = make_settings(
            "embedded", None, provider="openai", model="m", upstream_idle_timeout_seconds=2.0,
            upstream_max_retries=retries,
        )  # fmt: skip
        client: Client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for client in clients:
            await client.close()


@pytest_asyncio.fixture
async def serve(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    async with serving(monkeypatch) as start:
        yield start


async def relayed(client: Client) -> tuple[str, dict[str, Any]]:
    """One answer, read as a reader of /events/ reads it: its text and its terminal event's data."""
    created = await create_session(client, "Hi")
    stream = await wait_terminal(client, created["id"])
    last = stream.events[-1]
    return text_of(stream.events), {"event": last.type, **json.loads(last.data)}


async def test_chunked_body_cut_anywhere_with_extensions_and_trailers(raw: RawUpstream, serve: Any) -> None:
    body = b"".join(chunked(sse_events(), ext=b";name=value"))[:-2] + b"X-Trailer: t\r\n\r\n"
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    # cuts inside the headers, inside a chunk-size line, between CR and LF, inside a 4-byte character
    emoji = body.index("😀".encode()) + 2
    raw.replies.append(split(head + body, 20, len(head) + 1, len(head) + 30, emoji, len(head) + len(body) - 3))
    text, end = relayed_result = await relayed(await serve(raw))
    assert (text, end["event"], end["finish_reason"]) == ("".join(WORDS), "done", "stop"), relayed_result


async def test_a_kept_alive_connection_carries_the_next_answer(raw: RawUpstream, serve: Any) -> None:
    body = b"".join(sse_events())
    for _ in range(3):
        raw.replies.append([SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body])
    client = await serve(raw)
    for _ in range(3):
        assert (await relayed(client))[0] == "".join(WORDS)
    assert raw.connections == 1
    assert all(b"\r\nAccept-Encoding: identity\r\n" in r and b"gzip" not in r.lower() for r in raw.requests)


@pytest.mark.parametrize("last_chunk_after", [0.1, None], ids=["late", "never"])
async def test_a_last_chunk_after_the_answers_end_keeps_the_connection_if_it_comes(
    raw: RawUpstream, serve: Any, last_chunk_after: float | None
) -> None:
    """The answer ends at [DONE]; the body's terminating chunk may come a moment later (LINGER_SECONDS)."""
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    *events, end = chunked(sse_events())
    late = [last_chunk_after, end] if last_chunk_after is not None else [3.0, CLOSE]
    raw.replies += [[head + b"".join(events), *late], [head + b"".join(events), *late]]
    client = await serve(raw)
    for _ in range(2):
        text, done = await relayed(client)
        assert (text, done["event"]) == ("".join(WORDS), "done")
        await asyncio.sleep(0.3)  # the late chunk has come: the connection is back in the pool
    assert raw.connections == (1 if last_chunk_after is not None else 2)


async def test_a_body_ended_by_the_close_of_the_connection(raw: RawUpstream, serve: Any) -> None:
    """HTTP/1.0 style: no length, no chunks; the body ends where the connection does (RFC 9112 §6.3)."""
    events = sse_events()[:-1]  # no [DONE]: the finish reason and the close end the answer
    for _ in range(2):
        raw.replies.append([b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", *events, CLOSE])
    client = await serve(raw)
    for _ in range(2):
        text, end = await relayed(client)
        assert (text, end["event"]) == ("".join(WORDS), "done")
    assert raw.connections == 2


async def test_an_idle_connection_the_upstream_closed_is_not_used_again(raw: RawUpstream, serve: Any) -> None:
    body = b"".join(chunked(sse_events()))
    # It says keep-alive, then closes the connection a moment after the answer: with no retries allowed,
    # the next answer works only if that closed connection is not taken from the pool.
    raw.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body, 0.05, CLOSE])
    raw.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body])
    client = await serve(raw, retries=0)
    assert (await relayed(client))[0] == "".join(WORDS)
    await asyncio.sleep(0.2)
    assert (await relayed(client))[0] == "".join(WORDS)
    assert raw.connections == 2


async def test_an_interim_103_response_before_the_answer(raw: RawUpstream, serve: Any) -> None:
    body = b"".join(chunked(sse_events()))
    raw.replies.append(
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n",
            0.01,
            SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body,
        ]
    )
    assert (await relayed(await serve(raw)))[0] == "".join(WORDS)


@pytest.mark.parametrize(
    "reply",
    [
        [b"SSH-2.0-OpenSSH_9.6\r\n", CLOSE],  # not HTTP at all
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", CLOSE],  # two lengths
        [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n", CLOSE],  # closed inside the head
        [CLOSE],  # closed before a byte
    ],
    ids=["not-http", "two-lengths", "cut-head", "no-byte"],
)
async def test_a_response_that_is_not_http_is_an_unavailable_upstream_and_the_next_answer_works(
    raw: RawUpstream, serve: Any, reply: list[Any]
) -> None:
    raw.replies.append(reply)
    raw.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunked(sse_events()))])
    client = await serve(raw)
    text, end = await relayed(client)
    assert (text, end["event"], end["code"], end["retryable"]) == ("", "error", "upstream_unavailable", True)
    assert (await relayed(client))[0] == "".join(WORDS)


@pytest.mark.parametrize(
    "broken",
    [b"zz\r\n", b"5\r\nab", b"3\r\nabcdef\r\n"],
    ids=["bad-chunk-size", "closed-mid-chunk", "chunk-longer-than-its-size"],
)
async def test_a_body_broken_mid_answer_keeps_the_text_before_and_is_a_lost_connection(
    raw: RawUpstream, serve: Any, broken: bytes
) -> None:
    events = sse_events()
    raw.replies.append(
        [SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", *chunked(events[:2])[:-1], 0.05, broken, CLOSE]
    )
    text, end = await relayed(await serve(raw))
    assert (text, end["event"], end["code"]) == ("".join(WORDS[:2]), "error", "upstream_disconnected")


async def test_a_large_error_body_is_read_whole_and_classified(raw: RawUpstream, serve: Any) -> None:
    """The SDK reads an error body by pulling it: 600 KB, more than the buffer's high-water mark."""
    body = json.dumps({"error": {"message": "x" * 600_000, "type": "server_error"}}).encode()
    raw.replies.append(
        [
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body),
            *[body[i : i + 65536] for i in range(0, len(body), 65536)],
        ]
    )
    raw.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunked(sse_events()))])
    client = await serve(raw)
    text, end = await relayed(client)
    assert (text, end["event"], end["code"]) == ("", "error", "upstream_unavailable")
    assert (await relayed(client))[0] == "".join(WORDS)
    assert raw.connections == 1  # the error body was read to its end: the connection was kept


async def test_tls_upstream_verified_against_ssl_cert_file(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    upstream = RawUpstream(context=server_context)
    await upstream.start()
    try:
        body = b"".join(chunked(sse_events()))
        upstream.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body])
        client = await serve(upstream)
        # Not trusted yet: the handshake fails, which the SDK reports as a connection error.
        text, end = await relayed(client)
        assert (text, end["event"], end["code"]) == ("", "error", "upstream_unavailable")
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        client = await serve(upstream)  # a new provider: its TLS context reads the CA file
        assert (await relayed(client))[0] == "".join(WORDS)
    finally:
        await upstream.close()


async def test_the_pool_holds_at_most_its_limit_and_hands_a_freed_connection_on(raw: RawUpstream) -> None:
    body = b"".join(chunked(sse_events()))
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    raw.replies += [[head + body], [head, 1.0, body]]
    pool = Pool(limit=1, keepalive=5.0)
    key = ("http", "127.0.0.1", int(raw.url.rsplit(":", 1)[1]))
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    first = await pool.connection(key, pool_timeout=1.0, connect_timeout=1.0)
    with pytest.raises(TimeoutError):
        await pool.connection(key, pool_timeout=0.05, connect_timeout=1.0)
    waiting = asyncio.ensure_future(pool.connection(key, pool_timeout=2.0, connect_timeout=1.0))
    response = await first.send(request)
    while await response.body.read():
        pass
    assert not waiting.done()
    response.body.close()
    second = await waiting
    assert second is first  # kept alive and handed over
    response = await second.send(request)
    assert response.status == 200
    response.body.close()  # unfinished: the connection closes instead of going back
    third = await pool.connection(key, pool_timeout=1.0, connect_timeout=1.0)
    assert third is not first
    third.release(False)
    pool.close()
    assert raw.connections == 2


async def test_trailer_fields_are_not_taken_for_the_next_responses_headers(raw: RawUpstream, serve: Any) -> None:
    """A chunked body's trailer fields (here a Content-Type) end that response; the next one has its own."""
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"".join(chunked(sse_events()))[:-2] + b"Content-Type: text/plain\r\nX-Request-Id: old\r\n\r\n"
    raw.replies += [[head + body], [head + body]]
    client = await serve(raw)
    for _ in range(2):
        assert (await relayed(client))[0] == "".join(WORDS)
    assert raw.connections == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Type: text/event-stream\nTransfer-Encoding: chunked\n\n",  # bare LF line ends
        SSE_HEAD + b"X-Debug: a\x01b\r\nTransfer-Encoding: chunked\r\n\r\n",  # a control byte in a header value
    ],
    ids=["bare-lf", "control-byte"],
)
async def test_sloppy_but_readable_http_is_read_as_aiohttp_read_it(raw: RawUpstream, serve: Any, head: bytes) -> None:
    body = b"".join(b"%x  \r\n%s\r\n" % (len(e), e) for e in sse_events()) + b"0\r\n\r\n"  # spaces after each size
    raw.replies.append([head + body])
    assert (await relayed(await serve(raw)))[0] == "".join(WORDS)


async def test_an_error_body_ended_by_the_close_of_the_connection_is_read_whole(raw: RawUpstream, serve: Any) -> None:
    """An HTTP/1.0 401 whose body ends at the close: the SDK reads it whole and the refusal is not retried.
    Were the close taken for a broken body, it would be retried and reported as an unavailable upstream."""
    error = b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}'
    raw.replies.append([b"HTTP/1.0 401 Unauthorized\r\nContent-Type: application/json\r\n\r\n", 0.01, error, CLOSE])
    text, end = await relayed(await serve(raw, retries=2))
    assert (text, end["event"], end["code"], end["retryable"]) == ("", "error", "upstream_auth", False)
    assert len(raw.requests) == 1


@pytest.mark.parametrize("key", ["sk-test\n", "sk-test\r\nX-Injected: 1", "sk-test\r"])
async def test_a_key_with_a_line_break_is_never_sent(raw: RawUpstream, serve: Any, key: str) -> None:
    """Read from a file with its line end, a key would end the request's head early: nothing is sent."""
    raw.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunked(sse_events()))])
    text, end = await relayed(await serve(raw, key=key))
    assert (text, end["event"]) == ("", "error")
    assert raw.requests == []


async def test_tls_checks_the_upstreams_name(serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.example").configure_cert(server_context)  # trusted CA, another name
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    upstream = RawUpstream(context=server_context)
    await upstream.start()
    try:
        upstream.replies.append([SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunked(sse_events()))])
        text, end = await relayed(await serve(upstream))
        assert (text, end["event"], end["code"]) == ("", "error", "upstream_unavailable")
        assert upstream.requests == []
    finally:
        await upstream.close()


@pytest.mark.parametrize("leaves", ["cancelled", "timed-out"])
async def test_a_waiter_that_leaves_as_a_connection_frees_up_passes_it_on(leaves: str) -> None:
    """All connections busy: a waiting request that is cancelled, or whose pool timeout ends, in the same
    loop turn as a connection frees up raises what it should, and the next waiter gets that connection."""
    pool = Pool(limit=1, keepalive=5.0)
    loop = asyncio.get_running_loop()
    key = ("http", "127.0.0.1", 9)  # never connected: the slots are what is tested
    await pool._slot(None)
    first = asyncio.ensure_future(pool._slot(0.05 if leaves == "timed-out" else None))
    second = asyncio.ensure_future(pool._slot(None))
    await asyncio.sleep(0)
    if leaves == "cancelled":
        first.cancel()
        pool._free()  # the connection frees up in the same turn, before `first` runs again
    else:
        await asyncio.sleep(0.04)
        handle = loop.call_later(0.0105, pool._free)  # just after the timeout's cancel, before `first` runs
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    expected = asyncio.CancelledError if leaves == "cancelled" else TimeoutError
    assert isinstance(outcomes[0], expected), outcomes
    assert outcomes[1] is None  # the slot went on to the next waiter
    if leaves == "timed-out":
        handle.cancel()
    assert (pool._busy, len(pool._queue)) == (1, 0)
    del key


ON_UVLOOP = [
    test_chunked_body_cut_anywhere_with_extensions_and_trailers,
    test_an_idle_connection_the_upstream_closed_is_not_used_again,
    test_a_kept_alive_connection_carries_the_next_answer,
    test_trailer_fields_are_not_taken_for_the_next_responses_headers,
    test_an_error_body_ended_by_the_close_of_the_connection_is_read_whole,
    test_a_large_error_body_is_read_whole_and_classified,
]


@pytest.mark.parametrize("case", ON_UVLOOP, ids=lambda case: case.__name__.removeprefix("test_"))
def test_on_uvloop(case: Callable[[RawUpstream, Any], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """`chatbot serve` runs on uvloop, whose transports are not asyncio's: these cases again, on it."""

    async def run() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        upstream = RawUpstream()
        await upstream.start()
        try:
            async with serving(monkeypatch) as start:
                await case(upstream, start)
        finally:
            await upstream.close()

    uvloop.run(run())


@pytest.mark.parametrize("first", ["unfinished", "complete", "read in part"])
async def test_a_response_nobody_closes_gives_its_connection_back_once_dropped(
    raw: RawUpstream, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    """A cancel that lands after the transport answered but before the provider took the body drops the
    response unclosed: its pool slot must come back (here the pool holds one connection), not leak. An
    unfinished body closes its connection (the upstream stops); a complete one keeps it for the next."""
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"".join(chunked(sse_events()))
    opening: dict[str, list[Any]] = {
        "unfinished": [head, 5.0],
        "complete": [head + body],
        "read in part": [head + body[:40], 5.0],
    }
    raw.replies += [opening[first], [head + body]]
    transport = HttpTransport()
    transport._pool = Pool(limit=1, keepalive=5.0)
    timeouts = {"timeout": {"pool": 1.0, "connect": 1.0, "read": 5.0}}
    url = raw.url + "/v1/chat/completions"
    try:
        response = await transport.handle_async_request(httpx2.Request("POST", url, content=b"{}", extensions=timeouts))
        assert response.status_code == 200
        if first == "read in part":
            assert await take_body(response).body.read()
        elif first == "complete":
            await asyncio.sleep(0.05)  # the whole body has arrived
        del response
        gc.collect()  # a dropped response may sit in a reference cycle (an exception's traceback)
        response = await transport.handle_async_request(httpx2.Request("POST", url, content=b"{}", extensions=timeouts))
        assert response.status_code == 200
        assert b"".join([chunk async for chunk in response.aiter_raw()]).count(b"data:") == len(sse_events())
        await response.aclose()
    finally:
        await transport.aclose()
    # an unfinished body's connection closes, so the upstream stops generating; a complete one is reused
    assert raw.connections == (1 if first == "complete" else 2)
    assert "dropped without being closed" in caplog.text
