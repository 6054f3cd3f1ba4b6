"""The results as a markdown table against the issue's targets, and as plots."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], float | None], str, Callable[[float], bool] | None, bool]


def best_step(target: dict[str, Any], limit_ms: float = 25.0) -> dict[str, Any] | None:
    """The highest rate the server kept up with at p99 ≤ the limit."""
    passing = [
        s
        for s in target.get("ramp", [])
        if s["p99"] <= limit_ms and s["achieved"] >= 0.9 * s["offered"] and not s["errors"]
    ]
    return max(passing, key=lambda s: s["achieved"]) if passing else None


def _get(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def get(target: dict[str, Any]) -> float | None:
        value: Any = target
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


def _at_best(key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(target: dict[str, Any]) -> float | None:
        step = best_step(target)
        return None if step is None else float(step[key])

    return get


def _sum(a: Callable[[dict[str, Any]], float | None], b: Callable[[dict[str, Any]], float | None]) -> Any:
    def get(target: dict[str, Any]) -> float | None:
        x, y = a(target), b(target)
        return None if x is None or y is None else x + y

    return get


# (label, value, target text, target check, higher is better)
ROWS: list[Row] = [
    ("added TTFT p50 (ms)", _get("ttft", "added_p50"), "≤ 2", lambda v: v <= 2, False),
    ("added TTFT p99 (ms)", _get("ttft", "added_p99"), "≤ 10", lambda v: v <= 10, False),
    ("  p50 before the upstream wrote token 1 (ms)", _get("ttft", "added_before_upstream_p50"), "", None, False),
    (
        "    the upstream began later than asked directly, p50 (ms)",
        _get("ttft", "upstream_began_later_p50"),
        "",
        None,
        False,
    ),
    ("    POST /sessions round trip p50 (ms)", _get("ttft", "post_p50"), "", None, False),
    ("  p50 after the upstream wrote token 1 (ms)", _get("ttft", "added_after_upstream_p50"), "", None, False),
    ("relayed tokens/s, p99 ≤ 25 ms", _at_best("achieved"), "≥ 20,000", lambda v: v >= 20_000, True),
    ("  tokens per service CPU-second there", _at_best("tokens_per_cpu_s"), "", None, True),
    ("  Redis commands per token there", _at_best("commands_per_token"), "≤ 0.2", lambda v: v <= 0.2, False),
    ("  (incl. commands run inside Lua)", _at_best("executed_per_token"), "", None, False),
    ("  tokens per SSE event there", _at_best("tokens_per_event"), "", None, True),
    ("upstream→client p50 at 5k tok/s (ms)", _get("at_5k", "p50"), "", None, False),
    ("upstream→client p99 at 5k tok/s (ms)", _get("at_5k", "p99"), "≤ 10", lambda v: v <= 10, False),
    ("tokens per CPU-second at 5k tok/s", _get("at_5k", "tokens_per_cpu_s"), "", None, True),
    ("Redis commands per token at 5k tok/s", _get("at_5k", "commands_per_token"), "≤ 0.2", lambda v: v <= 0.2, False),
    ("open streams held", _get("streams", "streams"), "10,000", lambda v: v >= 10_000, True),
    ("  memory per stream (KiB)", _get("streams", "kib_per_stream"), "≤ 16", lambda v: v <= 16, False),
    ("    of which per answer, ÷ answers (KiB)", _get("streams", "kib_per_session"), "", None, False),
    ("    of which per reader, ÷ streams (KiB)", _get("streams", "kib_per_reader"), "", None, False),
    ("  Redis connections", _get("streams", "redis_connections"), "≤ 3", lambda v: v <= 3, False),
    ("  probe p99 with no streams (ms)", _get("streams", "probe_before_p99"), "", None, False),
    ("  probe p99 with all streams open (ms)", _get("streams", "probe_during_p99"), "holds", None, False),
    ("resume: first replayed event p50 (ms)", _get("resume", "p50"), "", None, False),
    ("resume: first replayed event p99 (ms)", _get("resume", "p99"), "≤ 20", lambda v: v <= 20, False),
    ("resume: reconnects", _get("resume", "reconnects"), "", None, True),
    (
        "resume + relay: gaps + duplicates",
        _sum(_get("resume", "gaps"), _get("resume", "duplicates")),
        "0",
        lambda v: v == 0,
        False,
    ),
]


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}"


def _ratio(service: float | None, baseline: float | None, higher_better: bool) -> str:
    if service is None or baseline is None or math.isnan(service) or math.isnan(baseline):
        return "–"
    good, bad = (service, baseline) if higher_better else (baseline, service)
    if bad <= 0:
        return "–"
    return f"×{good / bad:.1f}"


def table(results: dict[str, Any]) -> str:
    targets = results["targets"]
    m = results["machine"]
    lines = [
        f"`{results['command']}` — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Redis {m['redis']}, "
        f"service on core {m['service_core']}, load on {m['load_cores']}; {results['wall_seconds']:.0f} s",
    ]
    if any(targets.values()):
        lines += _targets(targets)
    lines += _cluster(results.get("cluster", {}))
    if results.get("peers"):
        lines += peers_table(results["peers"], runs=int(results["config"]["runs"]))
    return "\n".join(lines)


def _targets(targets: dict[str, Any]) -> list[str]:
    service, baseline = targets.get("service", {}), targets.get("baseline", {})
    lines = [
        "",
        "| figure | service | baseline | service's advantage | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, get, target_text, check, higher in ROWS:
        s, b = get(service), get(baseline)
        met = "" if check is None or s is None or math.isnan(s) else ("met" if check(s) else "**missed**")
        lines.append(f"| {label} | {_fmt(s)} | {_fmt(b)} | {_ratio(s, b, higher)} | {target_text} | {met} |")
    lines += ["", "Relay ramp (offered → achieved tokens/s, upstream→client latency, service core, load core):", ""]
    lines += ["| server | offered | achieved | p50 ms | p99 ms | tok/CPU-s | cmd/tok | tok/event | core | load core |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, target in targets.items():
        for s in target.get("ramp", []):
            lines.append(
                f"| {kind} | {s['offered']:,.0f} | {s['achieved']:,.0f} | {s['p50']:.2f} | {s['p99']:.2f} | "
                f"{s['tokens_per_cpu_s']:,.0f} | {s['commands_per_token']:.3f} | {s['tokens_per_event']:.2f} | "
                f"{s['service_core_busy']:.0%} | {s['load_core_busy']:.0%} |"
            )
    prof = service.get("profile")
    if prof and "self" in prof:
        step = prof["step"]
        title = (
            f"Service profile under relay load ({_spy(prof)}) at {step['offered']:,.0f} tok/s "
            f"offered ({step['achieved']:,.0f} achieved, p99 {step['p99']:.1f} ms)"
        )
        lines += _profile(title, prof)
    across = service.get("profile_across")
    if across:
        step = across["step"]
        for role in ("producer", "reader"):
            prof = across[role]
            if "self" in prof:
                title = (
                    f"Profile of the {role} instance, each reader on a second instance ({_spy(prof)}) at"
                    f" {step['offered']:,.0f} tok/s offered ({step['tokens_per_cpu_s']:,.0f} tokens per "
                    f"CPU-second of both)"
                )
                lines += _profile(title, prof)
    prof = service.get("profile_ttft")
    if prof and "self" in prof:
        title = f"Service profile of answers one at a time, as in the TTFT runs ({_spy(prof)})"
        lines += _profile(title, prof)
    return lines


def _spy(prof: dict[str, Any]) -> str:
    """How a profile was taken, for its title."""
    if prof.get("native"):
        return f"py-spy --native, the main thread's {prof['samples']} samples"
    return f"py-spy, {prof['samples']} samples"


def _over(ours: float | None, theirs: float | None) -> str:
    """ours ÷ theirs, e.g. ×0.31: below 1 the service is behind on a higher-is-better figure."""
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or theirs <= 0:
        return "–"
    return f"×{ours / theirs:.2f}"


def peers_table(peers: dict[str, Any], *, runs: int) -> list[str]:
    """The service beside each peer on the same workload, measured in the same run, as ratios."""
    labels = {
        "service": "**this service**",
        "service-start": "this service, every answer started at once (latency from the first token, CPU with start-up)",
        "service-cross": "this service, readers on a 2nd instance (CPU of both)",
        "service-inprocess": "this service, tokens made in-process as resumable-stream's (no upstream read)",
        **peers["labels"],
    }
    lines = [
        "",
        f"Peers on the same relay workload, interleaved in this run ({runs} round(s), medians; drivers from "
        f"`{peers['dir']}`). Tokens per CPU-second of the relay process alone (our service; Node; the nginx "
        "worker), then with Redis's CPU added; ratios are ours ÷ theirs (below 1: we are behind):",
        "",
        "| workload | system | tok / relay CPU-s | ours ÷ theirs | tok / CPU-s incl. Redis | ours ÷ theirs "
        "| Redis ms / 1k tok | p50 ms | p99 ms | delivered tok/s | lost + dup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in peers["workloads"]:
        systems = workload["systems"]
        ours = systems.get("service", {})
        shape = f"{workload['channels']:.0f} × {workload['tps']:g} tok/s × {workload['tokens']}"
        for name, got in systems.items():
            relay, with_redis = got.get("tokens_per_cpu_s"), got.get("tokens_per_cpu_s_with_redis")
            ours_ = name.startswith("service")
            ratio = "" if ours_ else _over(ours.get("tokens_per_cpu_s"), relay)
            ratio_redis = "" if ours_ else _over(ours.get("tokens_per_cpu_s_with_redis"), with_redis)
            wrong = got.get("lost", 0) + got.get("duplicates", 0)
            lines.append(
                f"| {shape} | {labels.get(name, name)} | {_fmt(relay)} | {ratio} | {_fmt(with_redis)} | {ratio_redis} "
                f"| {_fmt(got.get('redis_ms_per_1k'))} | {_fmt(got.get('p50'))} | {_fmt(got.get('p99'))} "
                f"| {_fmt(got.get('achieved'))} | {wrong:g} |"
            )
    for workload in peers["workloads"]:
        start = workload["systems"].get("service-start")
        if start:
            lines.append(
                f"\nEvery answer started at once, {workload['channels']:.0f} × {workload['tps']:g} tok/s: each "
                f"answer's first token p50 / p99 {_fmt(start.get('first_p50'))} / {_fmt(start.get('first_p99'))} ms "
                "from the upstream's write to the reader, who attaches only once its POST is answered (its GET "
                f"included); its 2nd to 4th tokens {_fmt(start.get('early_p50'))} / {_fmt(start.get('early_p99'))} "
                f"ms; time to first token from each POST {_fmt(start.get('ttft_p50'))} / "
                f"{_fmt(start.get('ttft_p99'))} ms (with the upstream's own first token at once)."
            )
    for name, why in peers.get("skipped", {}).items():
        lines.append(f"\n{labels.get(name, name)}: not run ({why}).")
    lines += [
        "",
        "Their input paths differ: the service parses an upstream's SSE per answer; Nchan parses one HTTP POST "
        "per token; resumable-stream makes its tokens inside Node and keeps them in the producer's memory. "
        "Nchan's memory storage uses no Redis. The row with tokens made in-process runs the service with its "
        "provider swapped for a source paced as resumable-stream's (`bench/inprocess_serve.py`): the same input "
        "path as that peer, the rest of the service unchanged.",
    ]
    return lines


def _cluster(on: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The relay on one Redis and on a cluster; where Redis would saturate, from its CPU per token."""
    if not on:
        return []
    lines = ["", "The service's relay on one Redis and on a Redis Cluster (three masters, no replicas):", ""]
    lines += [
        "| store | offered | achieved | p99 ms | tok/CPU-s | Redis CPU µs/tok | cmd/tok | Redis full at ≈ tok/s |"
    ]
    lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, steps in on.items():
        for s in steps:
            us = s["redis_us_per_token"]
            # each master serves 1/masters of the tokens and saturates when its share costs one core
            full = s["masters"] * 1e6 / us if us and not math.isnan(us) else float("nan")
            lines.append(
                f"| {label} | {s['offered']:,.0f} | {s['achieved']:,.0f} | {s['p99']:.2f} | "
                f"{s['tokens_per_cpu_s']:,.0f} | {us:.1f} | {s['commands_per_token']:.3f} | {full:,.0f} |"
            )
    return lines


def _profile(title: str, prof: dict[str, Any], top: int = 14) -> list[str]:
    inclusive = [(n, v) for n, v in prof["inclusive"] if "chatbot/" in n or "openai/" in n]
    by_package = ", ".join(f"{name} {share:.0f}%" for name, share in prof.get("packages", []) if share >= 0.5)
    lines = ["", title + ":", "", f"Self time by library: {by_package}.", ""]
    lines += ["| self % | file:function | | incl. % | file:function (chatbot, openai) |"]
    lines.append("|---:|---|---|---:|---|")
    for i in range(top):
        own = prof["self"][i] if i < len(prof["self"]) else ("", 0.0)
        inc = inclusive[i] if i < len(inclusive) else ("", 0.0)
        lines.append(
            f"| {own[1]:.1f} | `{own[0]}` | | {inc[1]:.1f} | `{inc[0]}` |" if own[0] or inc[0] else "| | | | | |"
        )
    return lines


def plots(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = results["targets"]
    fig, (relay, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, color in (("service", "tab:blue"), ("baseline", "tab:orange")):
        ramp = targets.get(kind, {}).get("ramp", [])
        if ramp:
            rates = [s["achieved"] for s in ramp]
            relay.plot(rates, [s["p99"] for s in ramp], "o-", color=color, label=f"{kind} p99")
            relay.plot(rates, [s["p50"] for s in ramp], "o--", color=color, alpha=0.6, label=f"{kind} p50")
        added = targets.get(kind, {}).get("ttft", {}).get("each", [])
        if added:
            values = np.sort(np.concatenate([run["added"] for run in added]))
            ttft.plot(values, np.linspace(0, 1, len(values)), color=color, label=kind)
    relay.axhline(25, color="grey", lw=0.8, ls=":")
    relay.set(xlabel="relayed tokens/s (one core)", ylabel="upstream → client latency (ms)", yscale="log")
    relay.set_title("Relay latency under open-loop load")
    if relay.get_legend_handles_labels()[0]:
        relay.legend(fontsize=8)
    ttft.set(xlabel="added time to first token (ms)", ylabel="fraction of runs", xscale="log")
    ttft.set_title("Added TTFT (through the server − direct)")
    if ttft.get_legend_handles_labels()[0]:
        ttft.legend(fontsize=8)
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
