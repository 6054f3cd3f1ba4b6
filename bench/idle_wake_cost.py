"""What a quiet spell costs the next piece of work: the same CPU work timed after 0 to 50 ms of idling.

The benchmark's time to first token sends one request at a time, and the service waits 10 ms between a
request and the upstream's first token, so every step of a new answer runs after a quiet spell. On some of
the VMs this project is measured on, work after 10 ms of idling takes 1.6 to 7 times longer than the same
work back to back (caches, branch predictors and TLBs refilled after the host ran something else on the
core, or a clock that slowed while idle); that part of the time to first token belongs to the machine. This
measures it for three pieces of the path:

- a pure-Python task (JSON encoding, about 60 µs when warm);
- the OpenAI SDK building and sending a streamed request (`OpenAIProvider`, up to our transport: the SDK's
  own work, as on the service's path to the upstream);
- a Redis PING round trip through redis-py's asyncio client (its own redis-server on a free port).

Each is run `--samples` times after each idle gap; the table gives the p50 of the process's CPU time
(`thread_time`) for it. Run it on a VM before comparing its time-to-first-token figures with another's.

    PYTHONPATH=. python bench/idle_wake_cost.py [--samples 300] [--gaps 0,1,3,10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis

from bench.procs import RedisServer
from bench.provider_request_cost import MESSAGES, OPENAI_BODY, _upstream
from chatbot.providers import transport
from chatbot.providers.openai_compat import OpenAIProvider

_PAYLOAD = [{"role": "user", "content": "What does the author's static site generator do with drafts?"}] * 5


def _python_task() -> int:
    return sum(len(json.dumps(_PAYLOAD)) for _ in range(20))


async def _after_gaps(work: Callable[[], Awaitable[float | None]], gaps: list[float], samples: int) -> list[float]:
    """p50 CPU µs of `work` after each idle gap (seconds), after 50 warm-up runs; a work that returns a
    figure is timed by it (µs) rather than as a whole."""
    for _ in range(50):
        await work()
    out = []
    for gap in gaps:
        spent = []
        for _ in range(samples):
            if gap:
                await asyncio.sleep(gap)
            started = time.thread_time_ns()
            own = await work()
            spent.append((time.thread_time_ns() - started) / 1000 if own is None else own)
        out.append(statistics.median(spent))
    return out


async def main(gaps: list[float], samples: int) -> None:
    runner = web.AppRunner(_upstream(OPENAI_BODY))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider = OpenAIProvider(
        model="bench-model",
        idle_timeout=30.0,
        max_retries=0,
        api_key="bench-key",
        base_url=f"http://127.0.0.1:{port}/v1",
    )
    cores = os.sched_getaffinity(0)
    redis_server = RedisServer(cores=cores, out=Path(tempfile.mkdtemp(prefix="chatbot-idle-wake-")))
    redis = Redis.from_url(redis_server.url)
    sdk_spent: list[int] = []
    original = transport.HttpTransport.handle_async_request

    async def reached_transport(self: transport.HttpTransport, request: object) -> object:
        sdk_spent.append(time.thread_time_ns())
        return await original(self, request)  # type: ignore[arg-type]

    async def python_task() -> None:
        _python_task()

    async def sdk_request() -> float:
        """The SDK's part only: from the provider's call until the request reaches our transport."""
        started = time.thread_time_ns()
        sdk_spent.clear()
        async for _item in provider.stream(MESSAGES):
            pass
        return (sdk_spent[0] - started) / 1000

    async def ping() -> None:
        await redis.ping()

    transport.HttpTransport.handle_async_request = reached_transport  # type: ignore[method-assign,assignment]
    try:
        rows = {
            "pure-Python task": await _after_gaps(python_task, gaps, samples),
            "Redis PING round trip (redis-py)": await _after_gaps(ping, gaps, samples),
            "OpenAI SDK: the request built, up to our transport": await _after_gaps(sdk_request, gaps, samples),
        }
    finally:
        transport.HttpTransport.handle_async_request = original  # type: ignore[method-assign]
        await redis.aclose()
        redis_server.stop()
        await provider.aclose()
        await runner.cleanup()
    head = " | ".join(f"after {gap * 1000:g} ms idle" for gap in gaps)
    print(f"| CPU µs of this process, p50 | {head} |\n|---|" + "---:|" * len(gaps))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in values) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gaps", default="0,1,3,10,50", help="idle gaps in ms, comma-separated")
    args = parser.parse_args()
    asyncio.run(main([float(g) / 1000 for g in args.gaps.split(",")], args.samples))
