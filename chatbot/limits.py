"""Who the client is, and the caps on what one client and one instance may hold open."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from .metrics import Metrics
from .problems import Problem
from .settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The peer address, or, when the peer is a trusted proxy, the nearest untrusted X-Forwarded-For hop."""
    peer = request.remote or ""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", []) for hop in header.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
        peer = hop
    return peer


def _is_ip(raw: str) -> bool:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        return False
    return True


def _is_trusted(raw: str, trusted: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return False
    return any(address in network for network in trusted)


class StreamCaps:
    """Open event streams on this instance, in all and per client address."""

    RETRY_AFTER_SECONDS = 5

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._metrics = metrics
        self._per_address = settings.max_streams_per_address
        self._total = settings.max_streams
        self._open: Counter[str] = Counter()
        self.open = 0

    @contextmanager
    def hold(self, address: str) -> Iterator[None]:
        """Count one stream for `address` while the block runs; a Problem if a cap is reached."""
        if self.open >= self._total:
            self._metrics.rejected.labels("streams_per_instance").inc()
            raise Problem(
                503, "instance-full", "Service Unavailable", "This instance holds as many streams as it may.",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        if self._open[address] >= self._per_address:
            self._metrics.rejected.labels("streams_per_address").inc()
            raise Problem(
                429, "too-many-streams", "Too Many Requests",
                f"At most {self._per_address} open event streams per client.",
                headers={"Retry-After": str(self.RETRY_AFTER_SECONDS)},
            )  # fmt: skip
        self._open[address] += 1
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            self._open[address] -= 1
            if not self._open[address]:
                del self._open[address]
