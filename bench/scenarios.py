"""The five measurements, each against one server (the service or the baseline) that the harness started."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import client
from .procs import RedisCluster, RedisServer, Server, Upstream
from .upstream import Script, parse_tokens

MS = 1e6  # ns per ms

# Commands the service issues only from inside its Lua scripts; INFO commandstats counts them as well
# as the EVALSHA that ran them, so they are subtracted to count what the service sends. `hset` is also
# sent directly, twice per new session (`create_session`), which a steady-state window holds none of;
# inside the append script it runs once per entry.
SCRIPT_ONLY = {
    "service": (
        "hmget", "hset", "xadd", "xrevrange", "time", "publish", "hget", "rpush", "ltrim", "incr", "pexpire", "pttl"
    )
}  # fmt: skip
HARNESS = ("info", "client|list", "client|setname", "flushall", "ping")


@contextlib.contextmanager
def _no_collector() -> Iterator[None]:
    """The load generator's own garbage collector off while latencies are taken, as the peers' drivers do
    (`gc.disable()` in ../shared/peers): a full collection of this process's heap (every token's latency
    is kept) paused it for 35-60 ms about 2 s into an answer, and each token it read meanwhile was counted
    as that much late; up to 140 of the 15,000 tokens of `relay_start`, as many as its p99 may hold."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Env:
    """What every scenario uses: Redis, the upstream, the load generator's HTTP client."""

    redis: RedisServer | RedisCluster
    upstream: Upstream
    http: aiohttp.ClientSession
    log: Callable[[str], None]


@dataclass
class Counters:
    """Service CPU, Redis commands and load-generator CPU between two instants."""

    env: Env
    server: Server
    start: dict[str, Any] = field(default_factory=dict)
    also: tuple[Server, ...] = ()  # more service processes whose CPU counts (readers on another instance)

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "cpu": self.server.cpu_seconds() + sum(s.cpu_seconds() for s in self.also),
            "load_cpu": time.process_time() + self.env.upstream.cpu_seconds() + self.env.redis.cpu_seconds(),
            "redis_cpu": self.env.redis.cpu_seconds(),
            "cmds": self.env.redis.commands(),
            "usec": self.env.redis.command_usec(),
        }

    def begin(self) -> None:
        self.start = self.snapshot()

    def end(self) -> dict[str, Any]:
        end = self.snapshot()
        wall = end["t"] - self.start["t"]
        deltas = {k: end["cmds"].get(k, 0) - self.start["cmds"].get(k, 0) for k in end["cmds"]}
        executed = sum(v for k, v in deltas.items() if k not in HARNESS)
        inner = sum(deltas.get(k, 0) for k in SCRIPT_ONLY.get(self.server.kind, ()))
        return {
            "wall": wall,
            "cpu": end["cpu"] - self.start["cpu"],
            "load_busy": (end["load_cpu"] - self.start["load_cpu"]) / wall,
            "redis_cpu": end["redis_cpu"] - self.start["redis_cpu"],
            "commands": executed - inner,
            "commands_executed": executed,
            "usec": {k: v - self.start["usec"].get(k, 0) for k, v in end["usec"].items() if k not in HARNESS},
        }


# -- 1. added time to first token -------------------------------------------------------------


async def _direct_first_token(env: Env, script: Script) -> tuple[float, float, float]:
    """(seconds to the first token, of which after the upstream wrote it, of which before the upstream began
    the answer), reading the upstream directly. The upstream stamps token 0 at its start + `script.delay`."""
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": script.message()}]}
    start, start_ns = time.perf_counter(), time.monotonic_ns()
    first = None
    async with env.http.post(env.upstream.url + "/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if first is None and b'"content":"' in line:
                received = time.monotonic_ns()
                first = time.perf_counter() - start
                content = json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
                stamped = parse_tokens(content)[0][1]
                relay = (received - stamped) / 1e9
                began = (stamped - start_ns) / 1e9 - script.delay
    assert first is not None
    return first, relay, began


async def _served_first_token(env: Env, server: Server, script: Script) -> tuple[float, float, float, float]:
    """The same through the server (POST /sessions, then GET /events/<id>), and the POST's round trip."""
    start, start_ns = time.perf_counter(), time.monotonic_ns()
    sid = await client.start(env.http, server.url, script)
    posted = time.perf_counter() - start
    first = None
    async with client.events_request(env.http, server.url, sid) as response:
        async for received, got in client.frames(response):
            tokens = [f for f in got if f.event == "token"]
            if first is None and tokens:
                first = time.perf_counter() - start
                stamped = parse_tokens(tokens[0].text())[0][1]
                relay = (received - stamped) / 1e9
                began = (stamped - start_ns) / 1e9 - script.delay
            if got[-1].event in ("done", "error"):
                break
    assert first is not None
    return first, relay, began, posted


async def ttft(env: Env, server: Server, *, runs: int, delay: float) -> dict[str, Any]:
    """Each run: the upstream directly, then through the server; added = the pair's difference."""
    script = Script(tokens=2, rate=1000.0, delay=delay)
    direct, served, relayed, began, posted = [], [], [], [], []
    for i in range(runs + 20):
        d, d_relay, d_began = await _direct_first_token(env, script)
        s, s_relay, s_began, s_posted = await _served_first_token(env, server, script)
        if i >= 20:  # the first runs warm connections and imports
            direct.append(d * 1e3)
            served.append(s * 1e3)
            relayed.append((s_relay - d_relay) * 1e3)
            began.append((s_began - d_began) * 1e3)
            posted.append(s_posted * 1e3)
    added = [s - d for s, d in zip(served, direct, strict=True)]
    before = [a - r for a, r in zip(added, relayed, strict=True)]
    return {
        "samples": runs,
        "delay_ms": delay * 1e3,
        "direct_p50": pct(direct, 50),
        "served_p50": pct(served, 50),
        "served_p99": pct(served, 99),
        "added_p50": pct(added, 50),
        "added_p99": pct(added, 99),
        # the added time split at the upstream's write of the first token
        "added_before_upstream_p50": pct(before, 50),
        "added_after_upstream_p50": pct(relayed, 50),
        "added_after_upstream_p99": pct(relayed, 99),
        # of the part before: how much later the upstream began answering than when asked directly, and
        # the POST /sessions round trip (which the upstream's start may overlap)
        "upstream_began_later_p50": pct(began, 50),
        "post_p50": pct(posted, 50),
        "added": added,
    }


# -- 2. relay throughput and latency ------------------------------------------------------------


@dataclass
class _Relay:
    """Per step: every token's upstream-to-client latency and the tokens received in the window."""

    window: tuple[int, int] = (0, 0)
    latencies: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)  # each answer's first token's, when inside the window
    early: list[int] = field(default_factory=list)  # the same for each answer's 2nd to 4th tokens
    # each answer's time to first token as its visitor sees it: from sending POST /sessions to the token
    ttft: list[int] = field(default_factory=list)
    last_ns: int = 0  # when the last token inside the window was received
    in_window: int = 0
    events_in_window: int = 0
    errors: int = 0
    gaps: int = 0

    def take(self, received_ns: int, got: list[client.Frame]) -> None:
        w0, w1 = self.window
        inside = w0 <= received_ns < w1
        for frame in got:
            if frame.event != "token":
                continue
            pairs = parse_tokens(frame.text())
            if inside:
                self.latencies.extend(received_ns - sent for _, sent in pairs)
                self.first.extend(received_ns - sent for seq, sent in pairs if seq == 0)
                self.early.extend(received_ns - sent for seq, sent in pairs if 1 <= seq <= 3)
                self.last_ns = max(self.last_ns, received_ns)
                self.in_window += len(pairs)
                self.events_in_window += 1


async def _relay_session(
    env: Env, server: Server, script: Script, at: float, stats: _Relay, reader: Server | None = None
) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    try:
        # An answer that is not over 30 s after its last token was due counts as failed.
        async with asyncio.timeout(script.tokens / script.rate + 30):
            await _relay_answer(env, server, script, stats, reader or server)
    except (aiohttp.ClientError, client.RequestFailed, OSError, TimeoutError) as exc:
        stats.errors += 1
        env.log(f"    relay session failed: {exc!r}")


async def _relay_answer(env: Env, server: Server, script: Script, stats: _Relay, reader: Server) -> None:
    posted = time.monotonic_ns()
    sid = await client.start(env.http, server.url, script)
    seen = 0
    async with client.events_request(env.http, reader.url, sid) as response:
        async for received, got in client.frames(response):
            if not seen and any(frame.event == "token" for frame in got):
                stats.ttft.append(received - posted)
            stats.take(received, got)
            seen += sum(len(f.text().split()) for f in got if f.event == "token")
            if got[-1].event in ("done", "error"):
                break
    stats.gaps += script.tokens - seen


async def relay_step(
    env: Env, server: Server, *, rate: float, per_session: float, seconds: float, warm: float
) -> dict[str, Any]:
    """Offer `rate` tokens/s as rate/per_session concurrent answers for `seconds`; see `relay_step_across`."""
    return await relay_step_across(env, server, None, rate=rate, per_session=per_session, seconds=seconds, warm=warm)


async def relay_step_across(
    env: Env, server: Server, reader: Server | None, *, rate: float, per_session: float, seconds: float, warm: float
) -> dict[str, Any]:
    """Offer `rate` tokens/s as rate/per_session concurrent answers for `seconds`; measure after `warm`.

    The answers start evenly over the first second (or `warm`, if shorter), at fixed times. With a
    `reader`, each answer is produced by `server` and read from `reader` (another instance on the same
    Redis); the CPU of both counts.
    """
    ramp = min(1.0, warm)
    sessions = max(1, round(rate / per_session))
    per = rate / sessions
    script = Script(tokens=int(per * (ramp + seconds + 0.5)), rate=per)
    stats = _Relay()
    t0 = time.monotonic() + 0.2
    w0, w1 = t0 + ramp + warm, t0 + ramp + seconds
    stats.window = (int(w0 * 1e9), int(w1 * 1e9))
    counters = Counters(env, server, also=() if reader is None else (reader,))
    with _no_collector():
        tasks = [
            asyncio.create_task(_relay_session(env, server, script, t0 + ramp * i / sessions, stats, reader))
            for i in range(sessions)
        ]
        await asyncio.sleep(w0 - time.monotonic())
        await _upstream(env, "stats")
        counters.begin()
        await asyncio.sleep(w1 - time.monotonic())
        used = counters.end()
        late = await _upstream(env, "stats")
        await asyncio.gather(*tasks)
    tokens = stats.in_window
    lat = [ns / MS for ns in stats.latencies]
    return {
        "offered": rate,
        "sessions": sessions,
        "achieved": tokens / used["wall"],
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat, default=float("nan")),
        "tokens_per_cpu_s": tokens / used["cpu"] if used["cpu"] else float("inf"),
        "service_core_busy": used["cpu"] / used["wall"],
        "commands_per_token": used["commands"] / tokens if tokens else float("nan"),
        "executed_per_token": used["commands_executed"] / tokens if tokens else float("nan"),
        "tokens_per_event": tokens / stats.events_in_window if stats.events_in_window else float("nan"),
        "load_core_busy": used["load_busy"],
        "redis_us_per_token": used["redis_cpu"] * 1e6 / tokens if tokens else float("nan"),
        # where Redis's time went, by command (a script's commands are counted again inside `evalsha`)
        "redis_command_us_per_token": {
            name: usec / tokens for name, usec in sorted(used["usec"].items(), key=lambda kv: -kv[1])[:8] if usec
        }
        if tokens
        else {},
        "upstream_late_p99": late["late_p99_ms"],
        "errors": stats.errors,
        "gaps": stats.gaps,
    }


async def relay_start(env: Env, server: Server, *, sessions: int, per_session: float, tokens: int) -> dict[str, Any]:
    """`sessions` answers started at the same instant, each `tokens` at `per_session` tokens/s, and every
    token's upstream-to-client latency from the first one on: the start of all answers at once included
    (each POST /sessions, the service's request to the upstream, each reader's GET /events, and the tokens
    of the answers that began first meanwhile), after five short answers that warm the process up. CPU is
    counted over the whole burst and its answers, their start-up included.
    Shaped as `relay_step`'s result, with `first_p50` / `first_p99`: each answer's first token alone;
    `early_p50` / `early_p99`: its 2nd to 4th tokens; `ttft_p50` / `ttft_p99`: from each POST to its
    answer's first token, as the visitor sees it.
    """
    script = Script(tokens=tokens, rate=per_session)
    # A few short answers first, so that a process that just started (first connections, lazy imports)
    # is not counted as the burst's cost: a burst meets a process that has served before.
    warm_up = Script(tokens=5, rate=100.0)
    await asyncio.gather(*(_relay_session(env, server, warm_up, time.monotonic(), _Relay()) for _ in range(5)))
    stats = _Relay()
    stats.window = (0, 2**63)
    counters = Counters(env, server)
    with _no_collector():
        at = time.monotonic() + 0.2
        await _upstream(env, "stats")
        counters.begin()
        await asyncio.gather(*(_relay_session(env, server, script, at, stats) for _ in range(sessions)))
        used = counters.end()
    late = await _upstream(env, "stats")
    tokens_in = stats.in_window
    lat = [ns / MS for ns in stats.latencies]
    first = [ns / MS for ns in stats.first]
    # delivered per second over the answers' own span: from their start to the last token's arrival, one
    # token's interval added (the run's wall time also holds the lead-in and the last answers' ends)
    span = stats.last_ns / 1e9 - at + 1 / per_session
    return {
        "offered": sessions * per_session,
        "sessions": sessions,
        "achieved": tokens_in / span if tokens_in else 0.0,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "max": max(lat, default=float("nan")),
        "first_p50": pct(first, 50),
        "first_p99": pct(first, 99),
        "early_p50": pct([ns / MS for ns in stats.early], 50),
        "early_p99": pct([ns / MS for ns in stats.early], 99),
        "ttft_p50": pct([ns / MS for ns in stats.ttft], 50),
        "ttft_p99": pct([ns / MS for ns in stats.ttft], 99),
        "tokens_per_cpu_s": tokens_in / used["cpu"] if used["cpu"] else float("inf"),
        "service_core_busy": used["cpu"] / used["wall"],
        "redis_us_per_token": used["redis_cpu"] * 1e6 / tokens_in if tokens_in else float("nan"),
        "upstream_late_p99": late["late_p99_ms"],
        "errors": stats.errors,
        "gaps": stats.gaps,
    }


async def _upstream(env: Env, what: str) -> dict[str, Any]:
    async with env.http.post(f"{env.upstream.url}/control/{what}", data=b"") as response:
        reply: dict[str, Any] = json.loads(await response.read())
        return reply


async def relay_ramp(
    env: Env,
    server: Server,
    *,
    rates: list[float],
    per_session: float,
    seconds: float,
    warm: float,
    limit_ms: float,
) -> list[dict[str, Any]]:
    """Raise the offered rate until p99 passes `limit_ms` or the server falls behind what is offered."""
    steps = []
    for rate in rates:
        step = await relay_step(env, server, rate=rate, per_session=per_session, seconds=seconds, warm=warm)
        env.log(
            f"    {server.kind} {rate:>7.0f} tok/s offered: {step['achieved']:>7.0f} achieved, p50 "
            f"{step['p50']:.2f} p99 {step['p99']:.2f} ms, {step['tokens_per_cpu_s']:.0f} tok/CPU-s, "
            f"{step['commands_per_token']:.3f} cmd/tok, core {step['service_core_busy']:.0%}, "
            f"load core {step['load_core_busy']:.0%}"
        )
        steps.append(step)
        if step["p99"] > limit_ms or step["achieved"] < 0.9 * rate or step["errors"]:
            break
    return steps


# -- 3. open streams -----------------------------------------------------------------------------


@dataclass
class _Readers:
    opened: int = 0
    failed: int = 0
    events: int = 0
    all_open: asyncio.Event = field(default_factory=asyncio.Event)


async def _reader(env: Env, server: Server, sid: str, at: float, readers: _Readers, target: int) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    try:
        async with client.events_request(env.http, server.url, sid) as response:
            if response.status != 200:
                raise client.RequestFailed(str(response.status))
            readers.opened += 1
            if readers.opened + readers.failed >= target:
                readers.all_open.set()
            async for _, got in client.frames(response):
                readers.events += len(got)
    except (aiohttp.ClientError, client.RequestFailed, OSError) as exc:
        readers.failed += 1
        if readers.failed <= 3:
            env.log(f"    stream failed: {exc!r}")
        if readers.opened + readers.failed >= target:
            readers.all_open.set()


async def _open_readers(
    env: Env, server: Server, sids: list[str], streams: int, open_rate: float, slack_s: float
) -> tuple[_Readers, list[asyncio.Task[None]], float]:
    """Open `streams` readers over `sids` at `open_rate` per second; wait until all are open (or failed)."""
    readers = _Readers()
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(_reader(env, server, sids[i % len(sids)], t0 + i / open_rate, readers, streams))
        for i in range(streams)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(readers.all_open.wait(), streams / open_rate + slack_s)
    return readers, tasks, time.monotonic() - t0


async def open_streams(
    env: Env, server: Server, *, streams: int, sessions: int, open_rate: float, probe: dict[str, float]
) -> dict[str, Any]:
    """Ramp idle and slow streams up to `streams`; memory, Redis connections, and an active probe's latency."""
    await relay_step(env, server, rate=200, per_session=50, seconds=0.5, warm=0.2)  # warm imports and pools
    before = await relay_step(env, server, **probe)
    gc.collect()
    rss0, conns0 = server.rss_bytes(), env.redis.service_connections()
    idle, slow = Script(tokens=0, hold=True), Script(tokens=1000, rate=0.2, hold=True)
    sids = [await client.start(env.http, server.url, slow if i % 2 else idle) for i in range(sessions)]
    await asyncio.sleep(1.0)
    rss_sessions = server.rss_bytes()
    readers, tasks, ramp_seconds = await _open_readers(env, server, sids, streams, open_rate, 60)
    await asyncio.sleep(1.0)
    rss1, conns1, files = server.rss_bytes(), env.redis.service_connections(), server.open_files()
    env.log(f"    {server.kind}: {readers.opened} open ({readers.failed} failed), RSS +{(rss1 - rss0) / 2**20:.0f} MiB")
    during = await relay_step(env, server, **probe)
    await _upstream(env, "release")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for task in tasks:
        task.cancel()
    return {
        "asked": streams,
        "file_limit": server.file_limit(),
        "streams": readers.opened,
        "failed": readers.failed,
        "sessions": sessions,
        "ramp_s": ramp_seconds,
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": rss1 / 2**20,
        "kib_per_stream": (rss1 - rss0) / 1024 / max(1, readers.opened),
        "kib_per_session": (rss_sessions - rss0) / 1024 / sessions,
        "kib_per_reader": (rss1 - rss_sessions) / 1024 / max(1, readers.opened),
        "redis_connections": conns1,
        "redis_connections_before": conns0,
        "open_files": files,
        "probe_before_p50": before["p50"],
        "probe_before_p99": before["p99"],
        "probe_during_p50": during["p50"],
        "probe_during_p99": during["p99"],
    }


# -- 4. resume -----------------------------------------------------------------------------------


@dataclass
class _Resume:
    first_event_ms: list[float] = field(default_factory=list)
    reconnects: int = 0
    gaps: int = 0
    duplicates: int = 0
    errors: int = 0


async def _resumer(env: Env, server: Server, script: Script, at: float, drop_mean: float, out: _Resume) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    seqs: list[int] = []
    try:
        # An answer not over a minute after its last token was due counts as failed.
        async with asyncio.timeout(script.tokens / script.rate + 60):
            await _resume_answer(env, server, script, random.Random(at), drop_mean, out, seqs)
    except (aiohttp.ClientError, client.RequestFailed, OSError, TimeoutError) as exc:
        out.errors += 1
        env.log(f"    resume session failed: {exc!r}")
        return
    out.duplicates += len(seqs) - len(set(seqs))
    out.gaps += script.tokens - len(set(seqs)) + sum(1 for a, b in itertools.pairwise(seqs) if b < a)


async def _resume_answer(
    env: Env, server: Server, script: Script, rng: random.Random, drop_mean: float, out: _Resume, seqs: list[int]
) -> None:
    """Read one answer, dropping the connection at random and resuming after the last id seen."""
    sid = await client.start(env.http, server.url, script)
    last: str | None = None
    while True:
        drop_in = rng.expovariate(1 / drop_mean)
        sent = time.monotonic_ns()
        first = last is None
        async with client.events_request(env.http, server.url, sid, last) as response:
            if response.status == 204:
                return  # the last id seen was the terminal event's
            if response.status != 200:
                raise client.RequestFailed(f"GET /events: {response.status}")
            try:
                async with asyncio.timeout(drop_in):
                    async for received, got in client.frames(response):
                        if not first:
                            out.first_event_ms.append((received - sent) / MS)
                            first = True
                        for frame in got:
                            last = frame.id
                            if frame.event == "token":
                                seqs.extend(seq for seq, _ in parse_tokens(frame.text()))
                            elif frame.event in ("done", "error"):
                                return
            except TimeoutError:
                response.close()  # the drop: whatever was in flight is lost to this client
        out.reconnects += 1
        await asyncio.sleep(rng.uniform(0.1, 0.3))  # the answer grows meanwhile: a backlog to replay


async def resume(
    env: Env, server: Server, *, sessions: int, arrival: float, drop_mean: float, script: Script
) -> dict[str, Any]:
    """Answers whose readers drop at random and reconnect with Last-Event-ID."""
    out = _Resume()
    t0 = time.monotonic() + 0.2
    await asyncio.gather(*(_resumer(env, server, script, t0 + i / arrival, drop_mean, out) for i in range(sessions)))
    env.redis.flush()
    return {
        "sessions": sessions,
        "reconnects": out.reconnects,
        "p50": pct(out.first_event_ms, 50),
        "p99": pct(out.first_event_ms, 99),
        "gaps": out.gaps,
        "duplicates": out.duplicates,
        "errors": out.errors,
    }


# -- memory of an open stream, by source line (tracemalloc; a separate, untimed run) --------------


async def _snapshot(server: Server, folder: Path, index: int) -> Path:
    """Ask the traced service for its `index`-th snapshot (it numbers them from 0) and wait for the file."""
    os.kill(server.pid, signal.SIGUSR1)
    for _ in range(600):
        if _written(folder / f"{index}.done"):
            return folder / f"{index}.snap"
        await asyncio.sleep(0.1)  # the marker file is the only notice
    raise RuntimeError("the traced service wrote no snapshot")


async def stream_memory(
    env: Env, server: Server, *, streams: int, sessions: int, open_rate: float, folder: Path, top: int = 25
) -> dict[str, Any]:
    """Heap growth per open stream, and per held answer before it, by the line that allocated it."""
    import tracemalloc

    idle = Script(tokens=0, hold=True)
    empty = await _snapshot(server, folder, 0)
    sids = [await client.start(env.http, server.url, idle) for _ in range(sessions)]
    await asyncio.sleep(1.0)
    before = await _snapshot(server, folder, 1)
    readers, tasks, _ = await _open_readers(env, server, sids, streams, open_rate, 120)
    await asyncio.sleep(2.0)
    after = await _snapshot(server, folder, 2)
    await _upstream(env, "release")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    def grown(new: Path, old: Path, count: int) -> tuple[float, list[tuple[str, float, float]]]:
        diff = tracemalloc.Snapshot.load(str(new)).compare_to(tracemalloc.Snapshot.load(str(old)), "lineno")
        lines = [
            (
                f"{_short_path(d.traceback[0].filename)}:{d.traceback[0].lineno}",
                d.size_diff / count,
                d.count_diff / count,
            )
            for d in diff[:top]
        ]
        return sum(d.size_diff for d in diff) / count, lines

    per_stream, lines = grown(after, before, max(1, readers.opened))
    per_answer, answer_lines = grown(before, empty, sessions)
    return {
        "streams": readers.opened,
        "traced_bytes_per_stream": per_stream,
        "lines": lines,
        "traced_bytes_per_answer": per_answer,
        "answer_lines": answer_lines,
    }


def _written(path: Path) -> bool:
    return path.exists()


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "wt-bench/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path
