"""`chatbot serve` under tracemalloc: each SIGUSR1 dumps a heap snapshot to $BENCH_SNAPSHOT_DIR/<n>.snap.

Used by `python -m bench --trace-memory` to see which lines hold the memory of an open stream. Tracing
slows the service several times over, so its figures are never mixed with the timed runs.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from chatbot.cli import main


def _dump(signum: int, frame: FrameType | None) -> None:
    folder = Path(os.environ["BENCH_SNAPSHOT_DIR"])
    count = len(list(folder.glob("*.snap")))
    tracemalloc.take_snapshot().dump(str(folder / f"{count}.snap"))
    (folder / f"{count}.done").touch()


if __name__ == "__main__":
    tracemalloc.start(int(os.environ.get("BENCH_TRACE_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, _dump)
    sys.exit(main(["serve"]))
