"""What the model produced, independent of the store: the oracle every "nothing lost" test compares with.

A reader's text is checked against the demo provider's deterministic answer (`demo_answer`) or a scripted
upstream, never only against the store's own copy, which a lossy writer would make agree with itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis

from chatbot.providers import Finish, Message, Usage
from chatbot.providers.demo import demo_answer


def expected_text(message: str, tokens: int) -> str:
    """The whole answer the demo provider gives to `message` with `tokens` deltas."""
    return "".join(demo_answer(message, tokens))


class BurstyDemo:
    """The demo's answer, `burst` deltas at a time with no pause between them.

    Deltas of one burst reach the producer before its batcher can run, so the coalescing writer must join
    them into one entry: a writer that keeps only part of what it coalesced shows up as missing text.
    """

    name = "bursty-demo"

    def __init__(self, *, tokens_per_second: float, answer_tokens: int, burst: int = 4) -> None:
        self._delay = burst / tokens_per_second
        self._tokens = answer_tokens
        self._burst = burst

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        message = next((m.content for m in reversed(messages) if m.role == "user"), "")
        deltas = demo_answer(message, self._tokens)
        for i, delta in enumerate(deltas):
            if i % self._burst == 0:
                await asyncio.sleep(self._delay)
            yield delta
        yield Finish("stop", Usage(input_tokens=len(message.split()), output_tokens=len(deltas)))

    async def aclose(self) -> None:
        return None


async def pause_writes(redis_url: str, seconds: float) -> None:
    """CLIENT PAUSE WRITE on a real redis-server: appends sent meanwhile wait in flight, reads go on."""
    async with aioredis.Redis.from_url(redis_url) as client:
        await client.client_pause(max(1, int(seconds * 1000)), all=False)


async def stall_writes_repeatedly(redis_url: str, *, pulses: int, pause: float = 0.15, gap: float = 0.15) -> None:
    """Several write pauses in a row, so that every live answer has deltas pile up behind an append."""
    for _ in range(pulses):
        await pause_writes(redis_url, pause)
        await asyncio.sleep(pause + gap)
