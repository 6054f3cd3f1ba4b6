"""The benchmark: `python -m bench [--quick]` (or `make bench`). Prints a table, writes bench/out/.

The harness starts its own redis-server (free port, no persistence), the paced fake upstream, and each
server under test as a subprocess: the service (`python -m chatbot serve`, CHATBOT_PROVIDER=openai at the
fake) and then the baseline (bench/baseline.py). The server gets one core; this load generator, the
upstream and Redis share the other. Everything listens on 127.0.0.1 and is stopped on the way out.
Last, the peers (bench/peers.py: Nchan, resumable-stream), when installed, interleaved with the service
on the same workload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from . import client, peers, profile, report, scenarios
from .procs import Cores, RedisCluster, RedisServer, Server, Upstream, machine, raise_nofile
from .scenarios import Env
from .upstream import Script

OUT = Path(__file__).resolve().parent / "out"
TARGETS = ("service", "baseline")
SCENARIOS = ("ttft", "relay", "streams", "resume", "cluster", "peers")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run; `QUICK` and `FULL` below, any field overridable on the command line."""

    runs: int = 3  # repeats of ttft, the 5k relay point and resume; medians are quoted
    ttft_runs: int = 1000  # per run; 20 more warm up first
    ttft_delay: float = 0.010
    rates: tuple[float, ...] = (1000, 1500, 2000, 2500, 3500, 5000, 10000, 15000, 20000, 30000, 40000)
    per_session: float = 50.0  # tokens/s of one answer
    step_seconds: float = 5.0
    step_warm: float = 1.5
    p99_limit_ms: float = 25.0
    latency_rate: float = 5000.0  # the rate of the "p99 at 5k tokens/s" target
    streams: int = 10_000
    stream_sessions: int = 900  # the service opens at most 1,000 upstream connections (transport.py)
    open_rate: float = 800.0  # new streams per second
    probe_seconds: float = 4.0  # active answers at 1,000 tokens/s, before and while the streams are open
    resume_sessions: int = 120
    resume_arrival: float = 8.0  # new answers per second: about 16 at once, 800 tokens/s in all
    resume_tokens: int = 100
    resume_rate: float = 50.0
    resume_drop_mean: float = 0.6  # seconds between drops, exponential
    profile_rate: float = 20000.0
    profile_seconds: float = 8.0
    profile_native: int = 0  # 1: py-spy --native (C frames and system calls; pauses the server per sample)
    cluster_rates: tuple[float, ...] = (1000, 3000, 5000)  # the relay on one Redis and on three masters
    # the peers' workload: C answers (each entry) × peer_tps tokens/s × peer_tokens tokens, interleaved runs
    peer_channels: tuple[float, ...] = (100, 400)
    peer_tps: float = 25.0
    peer_tokens: int = 150


FULL = Config()
QUICK = Config(
    runs=1,
    ttft_runs=150,
    rates=(1000, 5000, 10000, 20000),
    step_seconds=3.0,
    step_warm=1.0,
    streams=1000,
    stream_sessions=100,
    resume_sessions=30,
    resume_arrival=8.0,
    resume_tokens=60,
    profile_seconds=4.0,
    cluster_rates=(1000, 3000),
    peer_channels=(100,),
    peer_tokens=100,
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _server(
    kind: str,
    cores: Cores,
    redis: RedisServer | RedisCluster,
    upstream: Upstream,
    out: Path,
    extra_env: dict[str, str],
    entry: str = "chatbot",
) -> Iterator[Server]:
    """A fresh server per measurement, so that one's leftovers (memory, tasks) never colour the next."""
    redis.flush()
    server = Server(
        kind, cores=cores.service, out=out, redis_url=redis.url, upstream=upstream.url, extra_env=extra_env, entry=entry
    )
    try:
        yield server
    finally:
        server.stop()
        redis.flush()


async def _median_runs(
    name: str, runs: int, measure: Callable[[], Awaitable[dict[str, Any]]], done: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`done` and `runs` more runs of `measure`; each numeric figure is the median over them, the runs are kept."""
    results = list(done or [])
    for _ in range(runs):
        _log(f"  {name} run {len(results) + 1}/{runs + len(done or [])}")
        results.append(await measure())
    merged: dict[str, Any] = {"each": results}
    for key, value in results[0].items():
        if isinstance(value, int | float):
            merged[key] = statistics.median(r[key] for r in results)
    return merged


async def _target(
    kind: str,
    env: Env,
    cores: Cores,
    config: Config,
    *,
    only: set[str],
    prof: bool,
    trace_memory: bool,
    out_dir: Path,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    redis, upstream = env.redis, env.upstream
    out: dict[str, Any] = {}

    async def fresh(measure: Callable[[Server], Awaitable[Any]]) -> Any:
        started = time.monotonic()
        with _server(kind, cores, redis, upstream, out_dir, extra_env) as server:
            result = await measure(server)
        _log(f"    ({time.monotonic() - started:.0f} s)")
        return result

    if "ttft" in only:
        out["ttft"] = await _median_runs(
            f"{kind} ttft", config.runs,
            lambda: fresh(lambda s: scenarios.ttft(env, s, runs=config.ttft_runs, delay=config.ttft_delay)),
        )  # fmt: skip
    if "relay" in only:
        _log(f"  {kind} relay ramp")
        out["ramp"] = await fresh(
            lambda s: scenarios.relay_ramp(
                env, s, rates=list(config.rates), per_session=config.per_session,
                seconds=config.step_seconds, warm=config.step_warm, limit_ms=config.p99_limit_ms,
            )
        )  # fmt: skip
        step = {"per_session": config.per_session, "seconds": config.step_seconds, "warm": config.step_warm}
        in_ramp = [s for s in out["ramp"] if s["offered"] == config.latency_rate]
        out["at_5k"] = await _median_runs(
            f"{kind} relay at {config.latency_rate:,.0f} tok/s", config.runs - len(in_ramp),
            lambda: fresh(lambda s: scenarios.relay_step(env, s, rate=config.latency_rate, **step)),
            done=in_ramp,
        )  # fmt: skip
    if "streams" in only:
        _log(f"  {kind} open streams")
        probe = {"rate": 1000.0, "per_session": config.per_session, "seconds": config.probe_seconds, "warm": 1.0}
        # The baseline holds two sockets per stream (client, Redis) and needs the file limit for them.
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        streams = config.streams if kind == "service" else min(config.streams, (limit - 1000) // 2)
        out["streams"] = await fresh(
            lambda s: scenarios.open_streams(
                env, s, streams=streams, sessions=config.stream_sessions,
                open_rate=config.open_rate, probe=probe,
            )
        )  # fmt: skip
    if "resume" in only:
        script = Script(tokens=config.resume_tokens, rate=config.resume_rate)
        out["resume"] = await _median_runs(
            f"{kind} resume", config.runs,
            lambda: fresh(
                lambda s: scenarios.resume(
                    env, s, sessions=config.resume_sessions, arrival=config.resume_arrival,
                    drop_mean=config.resume_drop_mean, script=script,
                )
            ),
        )  # fmt: skip
    if trace_memory and kind == "service":
        _log(f"  {kind} memory of {config.streams:,} open streams, by line (tracemalloc)")
        folder = out_dir / "snapshots"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        redis.flush()
        traced = Server(
            kind, cores=cores.service, out=out_dir, redis_url=redis.url, upstream=upstream.url, traced=folder
        )
        try:
            out["memory"] = await scenarios.stream_memory(
                env, traced, streams=config.streams, sessions=config.stream_sessions,
                open_rate=config.open_rate / 4, folder=folder,
            )  # fmt: skip
        finally:
            traced.stop()
    if prof and kind == "service":
        # Where the CPU goes at the rate the server could no longer keep up with.
        broke = [s["offered"] for s in out.get("ramp", [])[-1:] if s["p99"] > config.p99_limit_ms]
        rate = min([config.profile_rate, *broke])
        _log(f"  {kind} profile at {rate:.0f} tok/s (py-spy)")
        out["profile"] = await fresh(lambda s: profile.relay(env, s, config, out_dir, rate))
        _log(f"  {kind} profile at {rate:.0f} tok/s, each reader on a second instance (py-spy on both)")
        with (
            _server(kind, cores, redis, upstream, out_dir, extra_env) as producer,
            _server(kind, cores, redis, upstream, out_dir, extra_env) as reader,
        ):
            out["profile_across"] = await profile.relay_across(env, producer, reader, config, out_dir, rate)
        _log(f"  {kind} profile of sequential answers (py-spy)")
        out["profile_ttft"] = await fresh(lambda s: profile.ttft(env, s, config, out_dir))
    return out


# Figures of the start of every answer at once, beside the relay's: first, 2nd to 4th tokens, time to first token.
_START_FIGURES = ("first_p50", "first_p99", "early_p50", "early_p99", "ttft_p50", "ttft_p99")


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"each": results}
    for key, value in results[0].items() if results else ():
        if isinstance(value, int | float):
            merged[key] = statistics.median(r[key] for r in results)
    return merged


def _service_figures(step: dict[str, Any]) -> dict[str, Any]:
    """The service's relay step in the peers' terms (a step that delivered nothing in its window gives 0s)."""
    delivered = step["tokens_per_cpu_s"] > 0 and math.isfinite(step["redis_us_per_token"])
    per_token = 1.0 / step["tokens_per_cpu_s"] + step["redis_us_per_token"] / 1e6 if delivered else math.inf
    return {
        "tokens_per_cpu_s": step["tokens_per_cpu_s"],
        "tokens_per_cpu_s_with_redis": 1.0 / per_token,
        "redis_ms_per_1k": step["redis_us_per_token"],  # µs per token = ms per 1,000 tokens
        "p50": step["p50"],
        "p99": step["p99"],
        "achieved": step["achieved"],
        "relay_core_busy": step["service_core_busy"],
        "lost": step["gaps"],
        "errors": step["errors"],
    }


async def _peers(
    env: Env, cores: Cores, config: Config, out_dir: Path, extra_env: dict[str, str], peers_dir: Path
) -> dict[str, Any]:
    """Each workload: `runs` rounds of (service, then every installed peer), medians per system."""
    missing = {peer.name: peer.missing(peers_dir) for peer in peers.PEERS}
    present = [peer for peer in peers.PEERS if missing[peer.name] is None]
    for name, why in missing.items():
        if why is not None:
            _log(f"  peers: {name} skipped: {why}")
    relay_cpu, load_cpu = min(cores.service), min(cores.load)
    workloads = []
    for channels in config.peer_channels:
        rate = channels * config.peer_tps
        answer_s = config.peer_tokens / config.peer_tps
        warm = min(1.0, answer_s / 4)
        seconds = max(warm + 1.0, answer_s - 1.0)
        each: dict[str, list[dict[str, Any]]] = {
            "service": [], "service-start": [], "service-cross": [], "service-inprocess": [],
            **{peer.name: [] for peer in present},
        }  # fmt: skip
        for round_ in range(config.runs):
            where = f"  peers: {channels:.0f} × {config.peer_tps:g} tok/s, round {round_ + 1}/{config.runs}"
            _log(f"{where}: service")
            with _server("service", cores, env.redis, env.upstream, out_dir, extra_env) as server:
                step = await scenarios.relay_step(
                    env, server, rate=rate, per_session=config.peer_tps, seconds=seconds, warm=warm
                )
            each["service"].append(_service_figures(step))
            spent = ", ".join(f"{name} {us:.1f}" for name, us in step["redis_command_us_per_token"].items())
            _log(f"    Redis µs per token by command: {spent}")
            _log(f"{where}: service, every answer started at once, latency from the first token")
            with _server("service", cores, env.redis, env.upstream, out_dir, extra_env) as server:
                start = await scenarios.relay_start(
                    env, server, sessions=int(channels), per_session=config.peer_tps, tokens=config.peer_tokens
                )
            each["service-start"].append({**_service_figures(start), **{key: start[key] for key in _START_FIGURES}})
            _log(f"{where}: service, each reader on a second instance")
            with (
                _server("service", cores, env.redis, env.upstream, out_dir, extra_env) as server,
                _server("service", cores, env.redis, env.upstream, out_dir, extra_env) as reader,
            ):
                step = await scenarios.relay_step_across(
                    env, server, reader, rate=rate, per_session=config.peer_tps, seconds=seconds, warm=warm
                )
            each["service-cross"].append(_service_figures(step))
            # The same, with each token made inside the service as resumable-stream makes its own (no upstream).
            _log(f"{where}: service, tokens made in-process")
            with _server(
                "service", cores, env.redis, env.upstream, out_dir, extra_env, entry="bench.inprocess_serve"
            ) as server:
                step = await scenarios.relay_step(
                    env, server, rate=rate, per_session=config.peer_tps, seconds=seconds, warm=warm
                )
            each["service-inprocess"].append(_service_figures(step))
            for peer in present:
                _log(f"{where}: {peer.name}")
                try:
                    figures = await asyncio.to_thread(
                        peers.run, peer, peers_dir, out_dir, channels=int(channels), tps=config.peer_tps,
                        tokens=config.peer_tokens, relay_cpu=relay_cpu, load_cpu=load_cpu,
                    )  # fmt: skip
                except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
                    _log(f"    {peer.name} failed: {exc!r}")
                    continue
                each[peer.name].append(figures)
        workloads.append(
            {
                "channels": channels,
                "tps": config.peer_tps,
                "tokens": config.peer_tokens,
                "systems": {name: _median(runs) for name, runs in each.items() if runs},
            }
        )
    return {
        "dir": str(peers_dir),
        "labels": {peer.name: peer.label for peer in peers.PEERS},
        "skipped": {name: why for name, why in missing.items() if why is not None},
        "workloads": workloads,
    }


async def run(
    config: Config,
    *,
    targets: list[str],
    only: set[str],
    prof: bool,
    trace_memory: bool,
    command: str,
    out: Path,
    extra_env: dict[str, str],
    peers_dir: Path = peers.PEERS_DIR,
) -> dict[str, Any]:
    cores = Cores.pick()
    os.sched_setaffinity(0, cores.load)
    results: dict[str, Any] = {
        "command": command,
        "machine": {**machine(), "service_core": sorted(cores.service), "load_cores": sorted(cores.load)},
        "config": dataclasses.asdict(config),
        "service_env": extra_env,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "targets": {},
    }
    redis = RedisServer(cores=cores.load, out=out)
    upstream = Upstream(cores=cores.load, out=out)
    start = time.monotonic()
    try:
        async with client.session() as http:
            env = Env(redis, upstream, http, _log)
            if "cluster" in only and "service" in targets:
                _log("service on one Redis and on a Redis Cluster:")
                results["cluster"] = await _on_cluster(env, cores, config, out_dir=out, extra_env=extra_env)
            for kind in targets:
                _log(f"{kind}:")
                results["targets"][kind] = await _target(
                    kind,
                    env,
                    cores,
                    config,
                    only=only,
                    prof=prof,
                    trace_memory=trace_memory,
                    out_dir=out,
                    extra_env=extra_env,
                )
            if "peers" in only:
                _log("peers:")
                results["peers"] = await _peers(env, cores, config, out, extra_env, peers_dir)
    finally:
        upstream.stop()
        redis.stop()
    results["wall_seconds"] = time.monotonic() - start
    return results


async def _on_cluster(
    env: Env, cores: Cores, config: Config, *, out_dir: Path, extra_env: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """The service's relay at each of `cluster_rates`, on the one Redis and on a cluster of three masters.

    The masters share the load cores with the load generator and the upstream, as the one Redis does; what
    compares is service CPU and Redis CPU per token (summed over the masters), not where Redis saturates.
    """
    cluster = RedisCluster(cores=cores.load, out=out_dir)
    on: dict[str, list[dict[str, Any]]] = {"one Redis": [], "cluster of 3 masters": []}
    try:
        stores: dict[str, RedisServer | RedisCluster] = {"one Redis": env.redis, "cluster of 3 masters": cluster}
        for label, store in stores.items():
            scoped = dataclasses.replace(env, redis=store)
            for rate in config.cluster_rates:
                _log(f"  relay at {rate:,.0f} tok/s on {label}")
                with _server("service", cores, store, env.upstream, out_dir, extra_env) as server:
                    step = await scenarios.relay_step(
                        scoped, server, rate=rate, per_session=config.per_session,
                        seconds=config.step_seconds, warm=config.step_warm,
                    )  # fmt: skip
                _log(
                    f"    achieved {step['achieved']:,.0f}, p99 {step['p99']:.1f} ms, "
                    f"{step['tokens_per_cpu_s']:,.0f} tok/CPU-s, Redis {step['redis_us_per_token']:.1f} µs/tok"
                )
                on[label].append({**step, "masters": len(cluster.nodes) if store is cluster else 1})
    finally:
        cluster.stop()
    return on


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small numbers: about two minutes")
    parser.add_argument("--targets", default=",".join(TARGETS), help="service,baseline,floor (no store)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="ttft,relay,streams,resume")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy the service under load (default: on for the full run)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT, help="where results, plots and logs go (bench/out)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Config field, e.g. --set streams=2000")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra setting for the service, e.g. --env CHATBOT_REDIS_POOL_SIZE=3")  # fmt: skip
    parser.add_argument("--trace-memory", action="store_true",
                        help="also: heap growth per open stream by source line (tracemalloc, slow)")  # fmt: skip
    parser.add_argument("--peers-dir", type=Path, default=peers.PEERS_DIR,
                        help="the peers' drivers (default: ../shared/peers beside the clone)")  # fmt: skip
    parser.add_argument("--table", type=Path, metavar="RESULTS_JSON", help="only print the table of earlier results")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(report.table(json.loads(args.table.read_text())))
        return 0
    config = QUICK if args.quick else FULL
    for item in args.set:
        name, _, raw = item.partition("=")
        current = getattr(config, name)
        value: Any = tuple(float(v) for v in raw.split(",")) if isinstance(current, tuple) else type(current)(raw)
        config = dataclasses.replace(config, **{name: value})
    prof = (not args.quick) if args.profile is None else args.profile
    if prof and profile.py_spy() is None:
        _log("py-spy not found: no profile")
        prof = False
    raise_nofile()
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops every process the harness started
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    targets, only = args.targets.split(","), set(args.only.split(","))
    coro = run(
        config,
        targets=targets,
        only=only,
        prof=prof,
        trace_memory=args.trace_memory,
        command=command.strip(),
        out=args.out,
        extra_env=dict(item.split("=", 1) for item in args.env),
        peers_dir=args.peers_dir,
    )
    try:
        import uvloop

        results = uvloop.run(coro)
    except ImportError:
        results = asyncio.run(coro)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = report.table(results)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    with contextlib.suppress(ImportError):
        report.plots(results, args.out)
    return 0
