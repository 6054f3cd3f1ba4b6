"""CPU per streamed upstream chunk: the SDKs' own streaming against this service's providers.

The upstream is a local fake (tests/providers_fakes.py: the exact wire formats).
The `floor` row is a client that only receives bytes; `service` is a row
minus the floor: the cost of turning bytes into text deltas.

burst: as in the issue's figures, one process: the upstream shares the event
  loop with the client and writes every event at once, so `process_time`
  counts both, and one read often carries several events.
paced: the upstream runs in another process and writes one event per TCP
  write, 1 ms apart, as a model streams tokens, so every event costs a read,
  a wake-up of the event loop, and a resumption of the reading task; only the
  client's CPU is counted.

    PYTHONPATH=. python bench/provider_chunk_cost.py [--chunks 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import anthropic
import openai

from chatbot.providers import Message
from chatbot.providers.anthropic_messages import AnthropicProvider
from chatbot.providers.openai_compat import OpenAIProvider
from tests.providers_fakes import FakeUpstream, Reply, anthropic_events, openai_events

PACE_SECONDS = 0.001
DELTA = "token "  # a typical delta: one short word
Case = Callable[[str, int], Awaitable[int]]  # (upstream url, chunks) → characters received


async def floor(url: str, chunks: int) -> int:
    """Sends the request by hand and only counts the bytes received."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    received = 0
    while data := await reader.read(65536):
        received += len(data)
    writer.close()
    return received


async def openai_sdk_typed(url: str, chunks: int) -> int:
    async with openai.AsyncOpenAI(api_key="k", base_url=url + "/v1", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        n = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += len(chunk.choices[0].delta.content)
        return n


async def openai_sdk_raw_lines(url: str, chunks: int) -> int:
    async with openai.AsyncOpenAI(api_key="k", base_url=url + "/v1", max_retries=0) as client:
        n = 0
        async with client.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as response:
            async for line in response.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices:
                        n += len(choices[0]["delta"].get("content") or "")
        return n


async def openai_sdk_aiohttp_client(url: str, chunks: int) -> int:
    """The SDK's own aiohttp option (DefaultAioHttpClient): still httpx2 and typed chunks on top."""
    async with openai.AsyncOpenAI(
        api_key="k", base_url=url + "/v1", max_retries=0, http_client=openai.DefaultAioHttpClient()
    ) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        n = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += len(chunk.choices[0].delta.content)
        return n


async def aiohttp_lines(url: str, chunks: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json={"model": "m", "stream": True}) as response,
    ):
        n = 0
        async for line in response.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices:
                    n += len(choices[0]["delta"].get("content") or "")
        return n


class Counting:
    """A sink that counts characters, as the producer's writer takes them (`Provider.relay`)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, text: str) -> None:
        self.n += len(text)

    def add_reasoning(self, text: str) -> None:
        pass


async def service_openai(url: str, chunks: int) -> int:
    provider = OpenAIProvider(model="m", idle_timeout=30, max_retries=0, api_key="k", base_url=url + "/v1")
    try:
        sink = Counting()
        await provider.relay([Message("user", "hi")], sink)
        return sink.n
    finally:
        await provider.aclose()


async def anthropic_sdk_text_stream(url: str, chunks: int) -> int:
    async with anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0) as client:
        n = 0
        async with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for text in stream.text_stream:
                n += len(text)
        return n


async def service_anthropic(url: str, chunks: int) -> int:
    provider = AnthropicProvider(model="m", idle_timeout=30, max_retries=0, api_key="k", base_url=url)
    try:
        sink = Counting()
        await provider.relay([Message("user", "hi")], sink)
        return sink.n
    finally:
        await provider.aclose()


CASES: list[tuple[str, str, Case]] = [
    ("floor: bare socket read (burst: + upstream)", "openai", floor),
    ("openai SDK, typed chunks (httpx2)", "openai", openai_sdk_typed),
    ("openai SDK, DefaultAioHttpClient, typed", "openai", openai_sdk_aiohttp_client),
    ("openai SDK raw response, iter_lines", "openai", openai_sdk_raw_lines),
    ("aiohttp readline + json.loads", "openai", aiohttp_lines),
    ("service: OpenAIProvider", "openai", service_openai),
    ("anthropic SDK, text_stream", "anthropic", anthropic_sdk_text_stream),
    ("service: AnthropicProvider", "anthropic", service_anthropic),
]


def _reply(api: str, chunks: int, pause: float) -> Reply:
    deltas = [DELTA] * chunks
    return Reply(openai_events(deltas) if api == "openai" else anthropic_events(deltas), pause=pause)


async def _timed(case: Case, url: str, chunks: int) -> float:
    gc.collect()
    start = time.process_time()
    received = await case(url, chunks)
    cpu = time.process_time() - start
    if case is not floor and received != len(DELTA) * chunks:
        raise AssertionError(f"{case.__name__}: received {received} characters")
    return cpu / chunks * 1e6


async def burst(case: Case, api: str, chunks: int, rounds: int) -> float:
    """Best CPU µs per chunk, upstream in this process."""
    runs = []
    for _ in range(rounds):
        fake = FakeUpstream()
        url = await fake.start()
        fake.script(_reply(api, chunks, 0.0))
        runs.append(await _timed(case, url, chunks))
        await fake.close()
    return min(runs)


async def paced(case: Case, api: str, chunks: int, rounds: int) -> float:
    """Best CPU µs per chunk of this process, upstream in a child process."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", api, "--chunks", str(chunks),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    url = (await child.stdout.readline()).decode().strip()
    try:
        return min([await _timed(case, url, chunks) for _ in range(rounds)])
    finally:
        child.stdin.close()
        await child.wait()


async def serve(api: str, chunks: int) -> None:
    """The child of `paced`: serves until its stdin closes."""
    fake = FakeUpstream()
    print(await fake.start(), flush=True)
    fake.script(_reply(api, chunks, PACE_SECONDS))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await fake.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument("--serve", choices=("openai", "anthropic"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return await serve(args.serve, args.chunks)
    results: dict[str, dict[str, float]] = {}
    for name, api, case in CASES:
        results[name] = {
            "paced": await paced(case, api, args.chunks, args.rounds),
            "burst": await burst(case, api, args.chunks, args.rounds),
        }
    floors = results[CASES[0][0]]
    print(f"CPU µs per upstream chunk ({args.chunks} chunks, best of {args.rounds}); service = row - floor")
    print(f"| {'client':42} | paced total | paced service | burst total | burst service |")
    print(f"|{'-' * 44}|------------:|--------------:|------------:|--------------:|")
    for name, cells in results.items():
        p, b = cells["paced"], cells["burst"]
        print(f"| {name:42} | {p:11.1f} | {p - floors['paced']:13.1f} | {b:11.1f} | {b - floors['burst']:13.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
