"""The benchmark harness runs end to end on tiny numbers; the real run is `make bench`, outside the suite."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.client import Frames
from bench.profile import summarise
from bench.upstream import Script, parse_tokens, token_event
from chatbot import events
from chatbot.eventstream import HEARTBEAT
from tests.sse import SSEParser

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "ttft_runs": "5",
    "rates": "500",
    "latency_rate": "500",
    "step_seconds": "1.2",
    "step_warm": "0.4",
    "resume_sessions": "4",
    "resume_tokens": "25",
    "resume_arrival": "20",
    "resume_drop_mean": "0.15",
}


# py-spy --native's raw output, cut down: the event loop's thread reading a socket, an idle executor thread.
NATIVE_RAW = (
    "_run_module_as_main (<frozen runpy>:198);main (chatbot/cli.py:82);Loop__run (uvloop/loop.c);"
    "uv__read (libuv/src/unix/stream.c);read (libc.so.6) 30\n"
    "_run_module_as_main (<frozen runpy>:198);main (chatbot/cli.py:82);"
    "relay_body (chatbot/providers/transport.py:255) 10\n"
    "Thread._bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:81);"
    "_queue_SimpleQueue_get (_queuemodule.c);0x7ff6ecea3f16 (libc.so.6) 60\n"
)


def test_a_native_profile_counts_the_main_thread_and_names_system_calls() -> None:
    everything = summarise(NATIVE_RAW)
    assert everything["samples"] == 100
    main = summarise(NATIVE_RAW, main_thread=True)
    assert main["samples"] == 40
    assert dict(main["self"]) == {"libc.so.6:read": 75.0, "chatbot/providers/transport.py:relay_body": 25.0}
    assert dict(main["packages"])["system calls and libc (--native)"] == 75.0


def test_frames_agree_with_the_spec_parser_however_the_bytes_are_cut() -> None:
    wire = events.retry_field(1000) + HEARTBEAT
    tokens = [events.Event(f"1-{i}", "token", events.token_data(f"{i}:5 é\u2028")) for i in range(50)]
    wire += b"".join(events.frame(event) for event in tokens)
    wire += events.frame(events.Event("2-0", "done", events.done_data("stop")))
    rng = random.Random(6)
    fast, spec = Frames(), SSEParser()
    got, want = [], []
    at = 0
    while at < len(wire):
        piece = wire[at : at + rng.randint(1, 40)]
        at += len(piece)
        got += [(f.id, f.event, f.data.decode()) for f in fast.feed(piece)]
        want += [(e.id, e.type, e.data) for e in spec.feed(piece)]
    assert got == want
    assert len(got) == 51


def test_token_text_round_trips() -> None:
    line = token_event(7, 123456789)
    content = json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
    assert parse_tokens(content + content.replace("7:", "8:")) == [(7, 123456789), (8, 123456789)]
    assert Script.parse(Script(tokens=3, rate=9.0, hold=True).message()) == Script(tokens=3, rate=9.0, hold=True)


@pytest.mark.timeout(150)
def test_quick_run_measures_every_server(tmp_path: Path) -> None:
    """The service, the baseline and the floor (`bench.baseline --store memory`, no store) each deliver every
    token once, resume by Last-Event-ID, and get their added time to first token."""
    argv = [sys.executable, "-m", "bench", "--quick", "--no-profile", "--out", str(tmp_path)]
    argv += ["--targets", "service,baseline,floor", "--only", "ttft,relay,resume"]
    for name, value in TINY.items():
        argv += ["--set", f"{name}={value}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| added TTFT p50 (ms) |" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for kind in ("service", "baseline", "floor"):
        target = results["targets"][kind]
        assert target["ttft"]["samples"] == 5
        assert 0 < target["ttft"]["added_p50"] < 1000
        (step,) = target["ramp"]
        assert step["achieved"] > 0.8 * step["offered"]
        assert (step["errors"], step["gaps"]) == (0, 0)
        assert 0 < step["p50"] <= step["p99"]
        assert target["at_5k"]["each"] == [step]  # the ramp's step at the latency rate is reused
        resume = target["resume"]
        assert resume["reconnects"] > 0
        assert (resume["gaps"], resume["duplicates"], resume["errors"]) == (0, 0, 0)


@pytest.mark.timeout(90)
def test_the_floor_script_gives_each_server_its_added_time_to_first_token() -> None:
    argv = [sys.executable, "bench/ttft_floor.py", "--rounds", "1", "--runs", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in done.stdout.splitlines() if line.startswith("| ")}
    for kind in ("floor", "baseline", "service"):
        assert 0 < float(rows[kind][2].split()[0]) < 1000, rows[kind]


@pytest.mark.timeout(90)
def test_peers_are_skipped_with_the_reason_when_not_installed(tmp_path: Path) -> None:
    """`make bench` still measures the service on the peers' workload when their drivers are absent."""
    argv = [sys.executable, "-m", "bench", "--quick", "--no-profile", "--out", str(tmp_path), "--only", "peers"]
    argv += ["--peers-dir", str(tmp_path / "no-peers"), "--set", "peer_channels=4", "--set", "peer_tokens=15"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stderr[-4000:]
    peers = json.loads((tmp_path / "results.json").read_text())["peers"]
    assert set(peers["skipped"]) == {"resumable-stream", "nchan-redis", "nchan-memory"}
    assert all("not found" in why for why in peers["skipped"].values())
    (workload,) = peers["workloads"]
    # every answer started at once; readers on a 2nd instance; tokens made in-process, as resumable-stream's
    assert set(workload["systems"]) == {"service", "service-start", "service-cross", "service-inprocess"}
    assert workload["systems"]["service-start"]["first_p99"] > 0
    for name in ("service", "service-start", "service-cross", "service-inprocess"):
        service = workload["systems"][name]
        assert service["achieved"] > 0.8 * 4 * 25 and service["lost"] == service["errors"] == 0, name
        assert service["tokens_per_cpu_s"] > 0 and service["redis_ms_per_1k"] >= 0  # Redis CPU: 10 ms ticks
    assert "| 4 × 25 tok/s × 15 | **this service** |" in done.stdout
    assert "| 4 × 25 tok/s × 15 | this service, readers on a 2nd instance (CPU of both) |" in done.stdout
    assert "| 4 × 25 tok/s × 15 | this service, tokens made in-process as resumable-stream's" in done.stdout
    assert "Nchan, memory (no Redis): not run" in done.stdout


def test_retrieval_bench_reports_recall_at_3_and_time_per_retrieval(tmp_path: Path) -> None:
    from bench import retrieval

    assert retrieval.main(["--quick", "--pages", "100", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert (result["pages"], result["questions"], result["samples"]) == (100, 52, 520)
    assert result["recall_at_3"] >= retrieval.TARGET_RECALL, result["misses"]
    assert 0 < result["search_p50_ms"] <= result["search_p99_ms"]
