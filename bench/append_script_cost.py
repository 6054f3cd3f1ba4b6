"""Redis's instructions per entry of the producer's append, counted by callgrind rather than timed.

On the shared VMs this project is measured on, Redis's CPU per token moves by a third between runs of the
same commit (bench/RESULTS.md), more than most changes to the append script. An instruction count does not:
this starts its own `redis-server` under `valgrind --tool=callgrind` on a free port, sends the store's own
batched append (`Store.append_many`, the script `store._APPEND_MANY`) for sessions that are already
streaming, and reads Redis's instructions over the measured calls alone (`callgrind_control` zeroes the
counters before them and dumps after). The same commit gives the same count to within 0.5 %.

Printed per batch size: instructions per entry, and per call (the EVALSHA's own parsing, lookup and reply
on top of its entries). The batcher's batches hold about 5 entries at 100 answers × 25 tokens/s and 20 at 400.
Needs `valgrind` (Debian's package). Redis runs about 50 times slower under it; the defaults take about a
minute.

    PYTHONPATH=. python bench/append_script_cost.py [--calls 1000] [--sizes 1,5,20]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from bench.procs import REDIS_SERVER, Proc, free_port, wait_until
from chatbot import ids, store
from chatbot.settings import Settings

SESSIONS = 100


class CallgrindRedis(Proc):
    """redis-server under callgrind, no persistence, on a free loopback port; its dumps go to `out`."""

    def __init__(self, out: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._out = out
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p", REDIS_SERVER]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(out)]
        super().__init__("redis-callgrind", argv, cores=os.sched_getaffinity(0), out=out, env={})
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_until(lambda: self._answers(client), what="redis-server under valgrind", proc=self, timeout=60)
        finally:
            client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], check=True, capture_output=True)

    def instructions(self) -> int:
        """Instructions executed since the last `zero` (a dump of the counters, read back)."""
        for old in self._out.glob("callgrind.*"):
            old.unlink()
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True, capture_output=True)
        (dump,) = self._out.glob("callgrind.*")
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {dump}")


async def _measure(server: CallgrindRedis, sizes: list[int], calls: int) -> dict[int, float]:
    """Instructions per entry for each batch size, over `calls` calls of the store's batched append."""
    st = await store.open_store(dataclasses.replace(Settings(), redis_url=server.url), owner="bench")
    try:
        sids = [ids.new_id() for _ in range(SESSIONS)]
        for sid in sids:
            await st.create_session(sid, ids.new_id(), "What is on this site?")
        turn = 0

        async def batches(size: int, count: int) -> None:
            nonlocal turn
            for _ in range(count):
                chosen = [sids[(turn + i) % SESSIONS] for i in range(size)]
                turn += size
                results = await st.append_many([(sid, "token", '{"text":" the"}') for sid in chosen])
                assert all(isinstance(r, store.AppendResult) and r.id for r in results), results

        await batches(1, SESSIONS)  # every session streaming, with a first entry
        out = {}
        for size in sizes:
            await batches(size, 50)  # warm: the script loaded, the streams' nodes allocated
            server.zero()
            await batches(size, calls)
            out[size] = server.instructions() / (calls * size)
        return out
    finally:
        await st.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--sizes", default="1,5,20", help="entries per call, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    out = Path(tempfile.mkdtemp(prefix="chatbot-append-cost-"))
    server = CallgrindRedis(out)
    try:
        per_entry = asyncio.run(_measure(server, sizes, args.calls))
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
    print("| entries per call | Redis instructions per entry | per call |\n|---:|---:|---:|")
    for size, count in per_entry.items():
        print(f"| {size} | {count:,.0f} | {count * size:,.0f} |")


if __name__ == "__main__":
    main()
