"""CPU per answer of starting an upstream request: the SDK's work before the first byte, for each provider.

One process holds a local upstream (aiohttp) and the provider, so `process_time` counts both. The upstream
answers every request with a three-event stream at once, so nearly all of the time is the request: the
SDK building it (params, headers, auth, URL), the httpx2 → aiohttp transport, the upstream's handler, and
the provider reading the short body. Run it before and after a change to the request path.

    PYTHONPATH=. python bench/provider_request_cost.py [--answers 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from aiohttp import web

from chatbot.providers import Message
from chatbot.providers.anthropic_messages import AnthropicProvider
from chatbot.providers.openai_compat import OpenAIProvider

OPENAI_BODY = (
    b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_BODY = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":1}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
MESSAGES = [Message("system", "You answer questions about this site."), Message("user", "What is on it?")]


def _upstream(body: bytes) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/messages", answer)
    return app


async def _measure(provider: Any, answers: int) -> float:
    """CPU milliseconds per answer over `answers` answers, one after the other."""
    start = time.process_time()
    for _ in range(answers):
        async for _item in provider.stream(MESSAGES):
            pass
    return (time.process_time() - start) / answers * 1000


async def main(answers: int, rounds: int) -> None:
    runner = web.AppRunner(_upstream(OPENAI_BODY))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    anthropic_runner = web.AppRunner(_upstream(ANTHROPIC_BODY))
    await anthropic_runner.setup()
    anthropic_site = web.TCPSite(anthropic_runner, "127.0.0.1", 0)
    await anthropic_site.start()
    anthropic_port = anthropic_runner.addresses[0][1]
    providers: dict[str, OpenAIProvider | AnthropicProvider] = {
        "openai": OpenAIProvider(
            model="bench-model", idle_timeout=30.0, max_retries=0, api_key="bench-key",
            base_url=f"http://127.0.0.1:{port}/v1",
        ),
        "anthropic": AnthropicProvider(
            model="bench-model", idle_timeout=30.0, max_retries=0, api_key="bench-key",
            base_url=f"http://127.0.0.1:{anthropic_port}",
        ),
    }  # fmt: skip
    try:
        print("| provider | CPU ms per answer (best of rounds) |\n|---|---:|")
        for name, provider in providers.items():
            await _measure(provider, 50)  # warm-up: connections, imports, caches
            best = min([await _measure(provider, answers) for _ in range(rounds)])
            print(f"| {name} | {best:.3f} |")
    finally:
        for provider in providers.values():
            await provider.aclose()
        await runner.cleanup()
        await anthropic_runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.answers, args.rounds))
