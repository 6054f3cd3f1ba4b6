"""CPU per pub/sub message as the hub reads its notices: redis-py's PubSub against `chatbot.pubsub.DirectPubSub`.

Starts its own redis-server (no persistence) on a free port and a publisher process that publishes notices
shaped like the append script's (`previous\\nid\\nevent\\ndata`) over 100 channels, three per pipeline at
2,500 messages a second (as 100 answers × 25 tokens/s arrive at a reader's instance). This process, on
uvloop as `chatbot serve` runs, reads them the way `Hub._listen` does; `process_time` counts its CPU only.

    PYTHONPATH=. python bench/pubsub_cost.py [--messages 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

from bench.procs import RedisServer
from chatbot.pubsub import DirectPubSub

CHANNELS = 100
PUBLISHER = """
import sys, time, redis
client = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
messages, group, gap = int(sys.argv[2]), 3, 3 / 2500
due = time.monotonic()
for i in range(0, messages, group):
    pipe = client.pipeline(transaction=False)
    for j in range(group):
        pipe.publish(f"notify:s{(i + j) % 100}", '1-0\\n1-1\\ntoken\\n{"text":"hello"}')
    pipe.execute()
    due += gap
    time.sleep(max(0.0, due - time.monotonic()))
"""


async def _read(pubsub: Any, port: int, messages: int, wait: float | None) -> float:
    """CPU µs per message while `messages` arrive; `pubsub` is subscribed to every channel first."""
    await pubsub.subscribe(*(f"notify:s{i}" for i in range(CHANNELS)))
    acks = 0
    while acks < CHANNELS:
        message = await pubsub.get_message(timeout=5.0)
        acks += message is not None and message["type"] == "subscribe"
    publisher = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER, str(port), str(messages))
    got = 0
    started = time.process_time()
    while got < messages:
        message = await pubsub.get_message(timeout=wait)
        got += message is not None and message["type"] == "message"
    spent = time.process_time() - started
    await publisher.wait()
    await pubsub.aclose()
    return spent / messages * 1e6


async def _redis_py(port: int, messages: int, wait: float | None) -> float:
    client = aioredis.Redis(port=port, decode_responses=True, socket_timeout=None, health_check_interval=30)
    try:
        return await _read(client.pubsub(), port, messages, wait)
    finally:
        await client.aclose()


async def _direct(port: int, messages: int) -> float:
    return await _read(DirectPubSub(host="127.0.0.1", port=port), port, messages, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    redis = RedisServer(cores=set(os.sched_getaffinity(0)), out=Path(tempfile.mkdtemp(prefix="chatbot-pubsub-cost-")))
    port = redis.port
    ways: dict[str, Callable[[], Coroutine[Any, Any, float]]] = {
        "redis-py PubSub.get_message(timeout=1.0) (the hub before)": lambda: _redis_py(port, args.messages, 1.0),
        "redis-py PubSub.get_message(timeout=None)": lambda: _redis_py(port, args.messages, None),
        "DirectPubSub.get_message(timeout=1.0) (the hub now)": lambda: _direct(port, args.messages),
    }
    try:
        for name, way in ways.items():
            figures = [uvloop.run(way()) for _ in range(args.rounds)]
            print(f"{name}: {min(figures):.1f} µs of CPU per message (best of {args.rounds} × {args.messages})")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
