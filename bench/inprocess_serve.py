"""`chatbot serve` with its answers made inside the process, as resumable-stream's are: the peers' comparison.

resumable-stream's driver (../shared/peers/rs_server.mjs) makes each token in Node, from one timer heap for
every answer, so it has no upstream to read. The service normally reads every token from an upstream over
HTTP (bench/upstream.py): a socket read, aiohttp's chunked-body reader and a JSON parse per token. This entry
point swaps only the provider (`chatbot.app.make_provider`) for `InProcessSource`, which reads the same
script from the user message (bench/upstream.py's `Script`: tokens, rate, delay) and yields the same token
text (`"<i>:<ns> "`, stamped when it is made), paced by one timer heap for every answer as the peer's are.
Everything after the provider is the product's code, unchanged: the batches of appends to Redis, the
stream entries, delivery to readers. So the service and resumable-stream then do the same work per token,
except what the service does more (every token stored in a Redis stream, resumable from any instance).

Only the benchmark uses it (`bench/run.py`, peers); `hold` scripts are not supported.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import sys
import time
from collections.abc import AsyncIterator, Sequence

from bench.upstream import Script
from chatbot import app
from chatbot.cli import main
from chatbot.providers import Finish, Message, Reasoning, Usage
from chatbot.settings import Settings

# Seconds: a token due within the loop timer's resolution is made now. The peer makes only tokens already
# due, but its timers never fire early; uvloop's can, by up to a millisecond (they count whole ms). A token
# is stamped when it is made, so this moves when tokens are made, not what their latency measures.
TICK = 0.001


class _Pacer:
    """One loop timer for every answer: a heap of (due time, order, waiter), due times in monotonic seconds."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[int]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    async def until(self, due: float) -> int:
        """Wait until `due`; the CLOCK_MONOTONIC ns when the pacer released this wait (the token's stamp)."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (due, next(self._order), waiter))
        self._arm()
        return await waiter

    def _arm(self) -> None:
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        # uvloop's timers count whole milliseconds: a shorter delay would fire at once and spin until `due`.
        # As the peer's pacer: at least 1 ms, rounded up.
        delay = max(1, math.ceil((due - time.monotonic()) * 1000)) / 1000
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = time.monotonic() + TICK
        stamp = time.monotonic_ns()  # one stamp for every token due now, as the peer's pacer does
        while self._heap and self._heap[0][0] <= now:
            _, _, waiter = heapq.heappop(self._heap)
            if not waiter.done():
                waiter.set_result(stamp)
        self._arm()


class InProcessSource:
    """A provider that makes the bench upstream's tokens itself, on the bench upstream's schedule."""

    name = "in-process"

    def __init__(self) -> None:
        self._pacer = _Pacer()

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
        script = Script.parse(next((m.content for m in reversed(messages) if m.role == "user"), ""))
        if script.hold:
            raise ValueError("the in-process source does not hold answers open")
        start = time.monotonic() + script.delay
        for seq in range(script.tokens):
            stamp = await self._pacer.until(start + seq / script.rate)
            yield f"{seq}:{stamp} "
        yield Finish("stop", Usage(input_tokens=1, output_tokens=script.tokens))

    async def aclose(self) -> None:
        return None


def _in_process(settings: Settings) -> InProcessSource:
    return InProcessSource()


if __name__ == "__main__":
    app.make_provider = _in_process
    sys.exit(main(["serve"]))
