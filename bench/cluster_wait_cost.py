"""What `WAIT 1` after each master's batch of appends would cost: `PYTHONPATH=. python -m bench.cluster_wait_cost`.

Starts the tests' cluster (three masters, three replicas on 127.0.0.1), creates 30 sessions, and times
rounds of one append each (one pipeline per master, as the store sends them), without and with a `WAIT 1`
at the end of each master's pipeline, alternately, 300 rounds each. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster

from chatbot import keys
from chatbot.settings import Settings
from chatbot.store import _master, open_store
from tests.cluster import running_cluster


async def main(url: str) -> None:
    s = dataclasses.replace(Settings(), redis_url=url)
    store = await open_store(s, owner="x")
    cl = store.redis
    assert isinstance(cl, RedisCluster)
    sids = [f"s{i}" for i in range(30)]
    for sid in sids:
        await store.create_session(sid, "c" + sid, "hi")
    sha = store._append.sha
    await cl.execute_command("SCRIPT LOAD", store._append.script, target_nodes=RedisCluster.PRIMARIES)
    groups: dict[str, list[str]] = {}
    for sid in sids:
        groups.setdefault(_master(cl, keys.stream(sid)).name, []).append(sid)

    async def node_round(group: list[str], wait: bool) -> list[Any]:
        async with cl.pipeline() as pipe:
            for sid in group:
                pipe.execute_command(
                    "EVALSHA",
                    sha,
                    3,
                    keys.stream(sid),
                    keys.meta(sid),
                    keys.lease(sid),
                    "token",
                    '{"text":"x"}',
                    30000,
                    "",
                    3600,
                    keys.notify_channel(sid),
                    "",
                )
            if wait:
                pipe.execute_command("WAIT", 1, 1000, target_nodes=_master(cl, keys.stream(group[0])))
            return await pipe.execute()

    out: dict[bool, list[tuple[float, float, float]]] = {}
    for wait in (False, True, False, True):
        lat: list[float] = []
        t0 = time.process_time()
        for _ in range(300):
            t = time.perf_counter()
            res = await asyncio.gather(*(node_round(g, wait) for g in groups.values()))
            lat.append(time.perf_counter() - t)
            if wait:
                assert all(r[-1] >= 1 for r in res), res
        cpu = time.process_time() - t0
        lat.sort()
        per_append_us = cpu / (300 * len(sids)) * 1e6
        out.setdefault(wait, []).append((statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3, per_append_us))
    for wait, rows in out.items():
        for p50, p99, cpu_us in rows:
            print(
                f"WAIT={wait}: a round of {len(sids)} appends over 3 masters: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                f"client CPU {cpu_us:.1f} µs per append"
            )
    await store.close()


if __name__ == "__main__":
    with running_cluster() as c:
        asyncio.run(main(c.url))
