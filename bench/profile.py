"""Where the service's CPU goes under relay load: py-spy samples, summarised per file:function."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import scenarios
from .procs import Server

if TYPE_CHECKING:
    from .run import Config

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "wt-bench/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _package(name: str) -> str:
    """Where a sampled leaf frame's time goes, coarsely: the library (or the event loop's wait)."""
    path = name.split(":", 1)[0]
    if name == "selectors.py:EpollSelector.select":
        return "waiting in epoll"
    for prefix, package in _PACKAGES:
        if path.startswith(prefix):
            return package
    return "other"


_PACKAGES = (
    ("redis/", "redis-py"),
    ("asyncio/", "asyncio"),
    ("selectors", "asyncio"),
    ("aiohttp/", "aiohttp"),
    ("chatbot/", "chatbot"),
    ("openai/", "openai SDK, httpx2, pydantic"),
    ("httpx2/", "openai SDK, httpx2, pydantic"),
    ("pydantic", "openai SDK, httpx2, pydantic"),
    ("concurrent/", "executor threads"),
    ("threading", "executor threads"),
    ("logging/", "logging"),
    ("json/", "json"),
    ("libc.so", "system calls and libc (--native)"),
)


# A stack of the service's main thread (the event loop's) holds this frame; `chatbot serve` runs it.
MAIN_FRAME = "_run_module_as_main"


def summarise(raw: str, top: int = 20, *, main_thread: bool = False) -> dict[str, Any]:
    """py-spy's collapsed stacks → self and inclusive shares of the samples per file:function.

    With `main_thread`, only stacks under MAIN_FRAME count: in py-spy's native mode an idle executor
    thread waiting on its queue is sampled as busy, and it would dilute every share.
    """
    packages: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if main_thread and MAIN_FRAME not in stack:
            continue
        count = int(count_text)
        total += count
        names = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match is not None:
                names.append(f"{_short(match['file'])}:{match['func']}")
        if not names:
            packages["no Python frame"] += count
            continue
        own[names[-1]] += count
        packages[_package(names[-1])] += count
        for name in set(names):
            inclusive[name] += count
    share = 100.0 / total if total else 0.0
    return {
        "samples": total,
        "packages": [(name, n * share) for name, n in packages.most_common()],
        "self": [(name, n * share) for name, n in own.most_common(top)],
        "inclusive": [(name, n * share) for name, n in inclusive.most_common(200)],
    }


async def _record(server: Server, raw: Path, *, after: float, seconds: float, native: bool = False) -> dict[str, Any]:
    """py-spy on the server from `after` seconds from now, for `seconds`.

    Python frames only, without pausing the server (`--nonblocking`); or, with `native`, C frames too
    (system calls, uvloop, the interpreter), which py-spy can only take by pausing it for each sample,
    and then only the main thread's samples are summarised.
    """
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy not found"}
    await asyncio.sleep(after)
    mode = "--native" if native else "--nonblocking"
    spy = await asyncio.create_subprocess_exec(
        binary, "record", mode, "--rate", "250", "--format", "raw", "--duration", str(int(seconds)),
        "--pid", str(server.pid), "--output", str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    code = await spy.wait()  # py-spy replaces any earlier output file
    if (text := _read(raw)) is None:
        return {"error": f"py-spy exited {code}"}
    return {**summarise(text, main_thread=native), "native": native}


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


async def relay(env: scenarios.Env, server: Server, config: Config, out: Path, rate: float) -> dict[str, Any]:
    """One relay step at `rate`, py-spy attached for its measured window."""
    seconds, warm = config.profile_seconds, 2.0
    # relay_step's start, its ramp of answers, then warm-up
    spying = asyncio.create_task(
        _record(
            server,
            out / "profile-relay.txt",
            after=0.2 + 1.0 + warm,
            seconds=seconds,
            native=bool(config.profile_native),
        )
    )
    step = await scenarios.relay_step(
        env, server, rate=rate, per_session=config.per_session, seconds=seconds + warm + 1, warm=warm
    )
    return {"step": step, **await spying}


async def relay_across(
    env: scenarios.Env, producer: Server, reader: Server, config: Config, out: Path, rate: float
) -> dict[str, Any]:
    """One relay step at `rate` with every reader on a second instance, py-spy on both for the measured window."""
    seconds, warm = config.profile_seconds, 2.0
    after = 0.2 + 1.0 + warm
    spying = [
        asyncio.create_task(
            _record(
                server,
                out / f"profile-across-{name}.txt",
                after=after,
                seconds=seconds,
                native=bool(config.profile_native),
            )
        )
        for name, server in (("producer", producer), ("reader", reader))
    ]
    step = await scenarios.relay_step_across(
        env, producer, reader, rate=rate, per_session=config.per_session, seconds=seconds + warm + 1, warm=warm
    )
    producing, reading = await asyncio.gather(*spying)
    return {"step": step, "producer": producing, "reader": reading}


async def ttft(env: scenarios.Env, server: Server, config: Config, out: Path) -> dict[str, Any]:
    """Answers one after the other, as in the TTFT measurement: where a session's set-up time goes."""
    seconds = config.profile_seconds
    spying = asyncio.create_task(
        _record(server, out / "profile-ttft.txt", after=1.0, seconds=seconds, native=bool(config.profile_native))
    )
    measured = await scenarios.ttft(env, server, runs=int(seconds * 60) + 60, delay=config.ttft_delay)
    return {"added_p50": measured["added_p50"], **await spying}
