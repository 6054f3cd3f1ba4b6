"""Who the client is, and the caps on what one client and one instance may hold open."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from .metrics import Metrics
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


class StreamCapReached(Exception):
    """A cap on open streams is reached; it passes as streams close, so the client should come back."""

    def __init__(self, limit: str, retry_after: float) -> None:
        super().__init__(f"{limit} reached")
        self.limit = limit  # "streams_per_address" | "streams_per_instance"
        self.retry_after = retry_after  # seconds


class StreamCaps:
    """Open event streams on this instance, in all and per client address."""

    INSTANCE_RETRY_SECONDS = 1.0  # another instance (or a freed slot) is likely soon
    ADDRESS_RETRY_SECONDS = 5.0  # the client's own tabs must close one first

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._metrics = metrics
        self._per_address = settings.max_streams_per_address
        self._total = settings.max_streams
        self._open: Counter[str] = Counter()
        self.open = 0

    @contextmanager
    def hold(self, address: str) -> Iterator[None]:
        """`take` a stream for `address` while the block runs."""
        self.take(address)
        try:
            yield
        finally:
            self.give_back(address)

    def take(self, address: str) -> None:
        """Count one stream for `address`; StreamCapReached if a cap is reached. `give_back` it when it ends."""
        if self.open >= self._total:
            self._metrics.rejected.labels("streams_per_instance").inc()
            raise StreamCapReached("streams_per_instance", self.INSTANCE_RETRY_SECONDS)
        if self._open[address] >= self._per_address:
            self._metrics.rejected.labels("streams_per_address").inc()
            raise StreamCapReached("streams_per_address", self.ADDRESS_RETRY_SECONDS)
        self._open[address] += 1
        self.open += 1

    def give_back(self, address: str) -> None:
        self.open -= 1
        self._open[address] -= 1
        if not self._open[address]:
            del self._open[address]
