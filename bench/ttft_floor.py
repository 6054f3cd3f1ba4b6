"""The least a relay can add to the time to first token on this machine, beside what the service adds.

The benchmark's target for the added time to first token is absolute (p50 ≤ 2 ms), while the time a
process takes to answer after a quiet spell differs by several times between the VMs this project is
measured on (`bench/idle_wake_cost.py`). This runs the TTFT scenario of `python -m bench` (one answer at a
time, the upstream's first token 10 ms after its request, each answer paired with the same request sent to
the upstream directly) against three servers in turn, pinned to the same core, in interleaved rounds:

- `floor`: `bench.baseline --store memory`, an aiohttp server and client and nothing else: the upstream's
  tokens go straight to the waiting reader, with no store, no SDK and no check;
- `baseline`: the same with one Redis `XADD` per token and a blocking `XREAD` per reader;
- `service`: `chatbot serve`.

The floor's added time is what the relay's extra loopback hops (the visitor to the relay and the relay to
the upstream, instead of the visitor to the upstream, and the same back) cost on this VM with the least
work in between; the service's figure less the floor's is what its own work adds. Printed: each server's
added p50 in each round, and the medians over the rounds of its added p50 and p99 and of the p50s before
and after the upstream's write of the first token.

    PYTHONPATH=. python bench/ttft_floor.py [--rounds 3] [--runs 300] [--delay-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from bench import client, scenarios
from bench.procs import Cores, RedisServer, Server, Upstream

KINDS = ("floor", "baseline", "service")
FIGURES = ("added_p50", "added_p99", "added_before_upstream_p50", "added_after_upstream_p50")


async def main(rounds: int, runs: int, delay: float) -> None:
    cores = Cores.pick()
    os.sched_setaffinity(0, cores.load)  # the load generator beside Redis and the upstream, as in `python -m bench`
    out = Path(tempfile.mkdtemp(prefix="chatbot-ttft-floor-"))
    redis = RedisServer(cores=cores.load, out=out)
    upstream = Upstream(cores=cores.load, out=out)
    got: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    try:
        async with client.session() as http:
            env = scenarios.Env(redis, upstream, http, print)
            for n in range(rounds):
                for kind in KINDS:
                    redis.flush()
                    server = Server(kind, cores=cores.service, out=out, redis_url=redis.url, upstream=upstream.url)
                    try:
                        measured = await scenarios.ttft(env, server, runs=runs, delay=delay)
                    finally:
                        server.stop()
                    got[kind].append({k: measured[k] for k in FIGURES})
                    print(f"round {n + 1}/{rounds} {kind}: added p50 {measured['added_p50']:.2f} ms")
    finally:
        upstream.stop()
        redis.stop()
    print(f"\n{runs} answers a round, the upstream's first token after {delay * 1000:g} ms; ms, median of {rounds}\n")
    print("| server | added p50 (each round) | added p99 | before the upstream's write, p50 | after it, p50 |")
    print("|---|---:|---:|---:|---:|")
    for kind in KINDS:
        each = got[kind]
        med = {k: statistics.median(r[k] for r in each) for k in FIGURES}
        rounds_text = ", ".join(f"{r['added_p50']:.2f}" for r in each)
        print(
            f"| {kind} | {med['added_p50']:.2f} ({rounds_text}) | {med['added_p99']:.2f} | "
            f"{med['added_before_upstream_p50']:.2f} | {med['added_after_upstream_p50']:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=300, help="answers per server per round (20 more warm up)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="the upstream's first-token delay")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.runs, args.delay_ms / 1000))
