"""The systems we compete with, on the relay workload, interleaved with the service in the same run.

The peers' drivers are not part of this repository: they live in `../shared/peers/` beside the clone (or
`--peers-dir`). Each prints one JSON result per run; this module starts them as subprocesses, one run at
a time, with the relay on the service's core and Redis and the load on the other, like the service.
A peer whose dependencies are missing is skipped with the reason (`make bench-peers-deps` installs them);
nothing is installed from here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT.parent / "shared" / "peers"
NODE_PREFIX = ROOT / "bench" / ".peers-node"  # `make bench-peers-deps` installs resumable-stream here
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
RS_VERSION, REDIS_CLIENT = "2.2.13", "redis@4.7.1"  # what rs_bench.py asks for by default
RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Peer:
    """One peer configuration: its driver, extra arguments, and how to read its figures."""

    name: str
    label: str
    driver: str
    extra: tuple[str, ...]
    relay_key: str  # tokens per CPU-second of the relay process only (nginx worker, Node)
    uses_redis: bool = True

    def missing(self, peers_dir: Path) -> str | None:
        """Why this peer cannot run here, or None."""
        if not (peers_dir / self.driver).is_file():
            return f"{peers_dir / self.driver} not found"
        if self.driver == "nchan_bench.py":
            if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
                return "nginx not installed (make bench-peers-deps)"
            if not NCHAN_MODULE.exists():
                return "libnginx-mod-nchan not installed (make bench-peers-deps)"
        if self.driver == "rs_bench.py":
            if shutil.which("node") is None:
                return "node not installed (make bench-peers-deps)"
            if not (NODE_PREFIX / "node_modules" / "resumable-stream" / "package.json").exists():
                return f"resumable-stream not installed in {NODE_PREFIX} (make bench-peers-deps)"
        return None

    def argv(
        self, peers_dir: Path, *, channels: int, tps: float, tokens: int, relay_cpu: int, load_cpu: int
    ) -> list[str]:
        cpu = ["--nginx-cpu" if self.driver == "nchan_bench.py" else "--node-cpu", str(relay_cpu)]
        argv = [sys.executable, str(peers_dir / self.driver), "run", "--channels", str(channels)]
        argv += ["--tps", f"{tps:g}", "--tokens", str(tokens), *cpu, "--gen-cpu", str(load_cpu)]
        argv += ["--redis-cpu", str(load_cpu), *self.extra]
        if self.driver == "rs_bench.py":
            argv += ["--prefix", str(NODE_PREFIX), "--rs-version", RS_VERSION, "--redis-client", REDIS_CLIENT]
        return argv


PEERS = (
    Peer("resumable-stream", "resumable-stream (Node, Redis pub/sub)", "rs_bench.py", (), "tokens_per_node_cpu_s"),
    Peer("nchan-redis", "Nchan, Redis storage", "nchan_bench.py", ("--redis-storage",), "tokens_per_nginx_cpu_s"),
    Peer("nchan-memory", "Nchan, memory (no Redis)", "nchan_bench.py", (), "tokens_per_nginx_cpu_s", uses_redis=False),
)


def figures(peer: Peer, raw: dict[str, Any]) -> dict[str, Any]:
    """A peer driver's result in the service's terms (tokens delivered in the window, CPU, latency)."""
    delivered = float(raw["delivered"])
    redis_ms = raw.get("redis_cpu_ms_per_1k_tokens")
    relay = raw.get(peer.relay_key)
    with_redis = None
    if relay and redis_ms is not None:
        # CPU-seconds per token of the relay plus those of Redis, as tokens per CPU-second
        with_redis = 1.0 / (1.0 / float(relay) + float(redis_ms) / 1e6)
    elif relay and not peer.uses_redis:
        with_redis = float(relay)
    return {
        "tokens_per_cpu_s": float(relay) if relay else float("nan"),
        "tokens_per_cpu_s_with_redis": with_redis if with_redis is not None else float("nan"),
        "redis_ms_per_1k": float(redis_ms) if redis_ms is not None else float("nan"),
        "p50": float(raw["p50_ms"]),
        "p99": float(raw["p99_ms"]),
        "achieved": float(raw["tokens_per_s"]),
        "delivered": delivered,
        "lost": int(raw["lost"]),
        "duplicates": int(raw["dups"]),
    }


def run(peer: Peer, peers_dir: Path, out: Path, **workload: Any) -> dict[str, Any]:
    """One run of a peer's driver; its stdout goes to out/peers-<name>.log, its JSON is returned as figures."""
    with tempfile.TemporaryDirectory(prefix="chatbot-bench-peer-") as tmp:
        result = Path(tmp) / "result.json"
        argv = [*peer.argv(peers_dir, **workload), "--json", str(result)]
        with (out / f"peers-{peer.name}.log").open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )  # fmt: skip
        if not result.exists():
            raise RuntimeError(f"{peer.name} driver exited {done.returncode} without results (see {log.name})")
        (raw,) = json.loads(result.read_text())["results"]
    return {**figures(peer, raw), "command": " ".join(argv[1:-2]), "exit": done.returncode}
