"""CPU per store call on one Redis: the redis-py path under every append, read and session look-up.

Starts its own redis-server (no persistence) on a free port, then times the store's calls one after
another in this process: `append_many` of one entry (the batcher's call when one session writes at a
time) and of 20 sessions' entries (its call at 10,000 tokens/s with 2 ms between batches), and `session`
(a plain HGETALL, as every GET /events makes). `process_time` counts this process only, so Redis's own
work is left out. Run it with `PYTHONPATH` at two checkouts to compare them.

    PYTHONPATH=. python bench/store_call_cost.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.procs import RedisServer
from chatbot import ids, store
from chatbot.settings import Settings


async def _best(call: Callable[[], Awaitable[Any]], calls: int, rounds: int) -> float:
    """The lowest CPU µs per call over `rounds` runs of `calls` calls, after 200 to warm up."""
    best = float("inf")
    for _ in range(rounds):
        for _ in range(200):
            await call()
        started = time.process_time()
        for _ in range(calls):
            await call()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


async def _measure(url: str, calls: int, rounds: int) -> dict[str, float]:
    st = await store.open_store(dataclasses.replace(Settings(), redis_url=url), owner="bench")
    try:
        sids = [ids.new_id() for _ in range(20)]
        for sid in sids:
            await st.create_session(sid, ids.new_id(), "What is on this site?")
        sid = sids[0]
        entry = [(sid, "token", '{"text":"x"}')]
        batch = [(one, "token", '{"text":" the"}') for one in sids]
        return {
            "append_many, one entry": await _best(lambda: st.append_many(entry), calls, rounds),
            "append_many, 20 sessions' entries": await _best(lambda: st.append_many(batch), calls, rounds),
            "session (HGETALL)": await _best(lambda: st.session(sid), calls, rounds),
        }
    finally:
        await st.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis = RedisServer(cores=set(os.sched_getaffinity(0)), out=Path(tempfile.mkdtemp(prefix="chatbot-store-cost-")))
    try:
        figures = asyncio.run(_measure(redis.url, args.calls, args.rounds))
    finally:
        redis.stop()
    for name, micros in figures.items():
        print(f"{name}: {micros:.1f} µs of CPU per call (best of {args.rounds} × {args.calls})")


if __name__ == "__main__":
    main()
