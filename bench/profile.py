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


def summarise(raw: str, top: int = 18) -> dict[str, Any]:
    """py-spy's collapsed stacks → self and inclusive shares of the samples per file:function."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match is not None:
                names.append(f"{_short(match['file'])}:{match['func']}")
        if not names:
            continue
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    share = 100.0 / total if total else 0.0
    return {
        "samples": total,
        "self": [(name, n * share) for name, n in own.most_common(top)],
        "inclusive": [(name, n * share) for name, n in inclusive.most_common(top * 3)],
    }


async def relay(env: scenarios.Env, server: Server, config: Config, out: Path) -> dict[str, Any]:
    """One relay step at `profile_rate` with py-spy attached for its measured window (sampling, nonblocking)."""
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy not found"}
    raw = out / "profile.txt"
    raw.unlink(missing_ok=True)
    seconds, warm = config.profile_seconds, 2.0

    async def attach_after_warm_up() -> int:
        await asyncio.sleep(0.2 + 1.0 + warm)  # relay_step's start, its ramp of answers, then warm-up
        spy = await asyncio.create_subprocess_exec(
            binary, "record", "--nonblocking", "--rate", "250", "--format", "raw", "--duration", str(int(seconds)),
            "--pid", str(server.pid), "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await spy.wait()

    spying = asyncio.create_task(attach_after_warm_up())
    step = await scenarios.relay_step(
        env, server, rate=config.profile_rate, per_session=config.per_session, seconds=seconds + warm + 1, warm=warm
    )
    code = await spying
    summary = summarise(raw.read_text()) if raw.exists() else {"error": f"py-spy exited {code}"}
    return {"step": step, **summary}
