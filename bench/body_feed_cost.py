"""CPU per upstream event on the push path, without sockets: `Connection.data_received` → llhttp →
`relay_body` → a counting sink, with 1, 5 or 20 chunked SSE events in each read.

One event per read is a paced model's stream; several per read come when the service falls behind (or
an upstream sends in bursts). Each size runs three times, interleaved; µs of CPU per event.

    PYTHONPATH=. python bench/body_feed_cost.py [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.provider_chunk_cost import Counting
from chatbot.providers.http1 import Connection, Pool
from chatbot.providers.openai_compat import ChunkParser
from chatbot.providers.transport import relay_body

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"token "}}]}\n\n'
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Transport:
    """Takes the request and nothing else: the events are fed to the protocol by hand."""

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def per_event(per_read: int, events: int) -> float:
    conn = Connection(Pool(limit=1, keepalive=5.0), ("http", "upstream", 80))
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    head = conn.send(b"")
    conn.data_received(HEAD)
    response = await head
    sink = Counting()
    relay = asyncio.ensure_future(relay_body(response.body, ChunkParser(), sink))
    await asyncio.sleep(0)
    data, reads = CHUNK * per_read, events // per_read
    start = time.process_time()
    for _ in range(reads):
        conn.data_received(data)
    cpu = time.process_time() - start
    relay.cancel()
    if sink.n != len("token ") * reads * per_read:
        raise AssertionError(f"{sink.n} characters relayed")
    return cpu / (reads * per_read) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    sizes = (1, 5, 20)
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(3):
        for n in sizes:
            runs[n].append(await per_event(n, args.events))
    print("| events per read | µs per event (3 runs) |")
    print("|---:|---|")
    for n in sizes:
        print(f"| {n} | {', '.join(f'{v:.2f}' for v in runs[n])} |")


if __name__ == "__main__":
    asyncio.run(main())
