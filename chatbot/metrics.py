"""Prometheus metrics, in a registry the app owns (no process-wide state)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Tally(Collector):
    """A counter without labels that is bumped per token: a plain number, read by the registry at scrape time.

    Exposed as a prometheus_client `Counter` is (`<name>_total` and `<name>_created`), through the
    library's custom-collector interface. A `Counter` takes a lock on every `inc`, for other threads; this
    one is only touched from the event loop's thread. Two of them were counted once per token, or once per
    token per reader (bench/RESULTS.md).
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.value = 0
        self._name = name
        self._documentation = documentation
        self._created = time.time()
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def collect(self) -> Iterable[Metric]:
        # `_created` as a Counter has it: left out under PROMETHEUS_DISABLE_CREATED_SERIES (or after
        # prometheus_client.disable_created_metrics()), which the library keeps in this module attribute.
        created = self._created if getattr(prometheus_client.metrics, "_use_created", True) else None
        yield CounterMetricFamily(self._name, self._documentation, value=self.value, created=created)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation)]


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.open_streams = Gauge("chatbot_open_streams", "Event streams open on this instance.", registry=r)
        self.active_generations = Gauge(
            "chatbot_active_generations", "Answers being generated on this instance.", registry=r
        )
        self.sessions = Counter("chatbot_sessions", "Sessions ended, by outcome.", ["outcome"], registry=r)
        self.tokens_relayed = Tally(
            "chatbot_tokens_relayed", "Text deltas received from the provider and stored.", registry=r
        )
        self.events_sent = Tally(
            "chatbot_events_sent",
            "Events written to event-stream responses (handed to the socket; a client that left may not have"
            " read them; the same event counts once per response that carries it).",
            registry=r,
        )
        self.retry_answers = Counter(
            "chatbot_events_retry_answers",
            "Event-stream requests answered with only retry: for a condition that passes, by reason.",
            ["reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "chatbot_client_disconnects",
            "Clients that left early: before their response started, or during an event stream.",
            ["stage"],
            registry=r,
        )
        self.ttft = Histogram(
            "chatbot_time_to_first_token_seconds",
            "From the session's creation to its first stored token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "chatbot_upstream_errors", "Provider failures, by error code.", ["code"], registry=r
        )
        self.redis_errors = Counter(
            "chatbot_redis_errors", "Failed Redis operations, by component.", ["component"], registry=r
        )
        self.rejected = Counter(
            "chatbot_rejected_requests", "Requests refused by a limit, by limit.", ["limit"], registry=r
        )

    def watch(self, *, open_streams: Callable[[], float], active_generations: Callable[[], float]) -> None:
        """Read gauges from their owners at scrape time instead of tracking them twice."""
        self.open_streams.set_function(open_streams)
        self.active_generations.set_function(active_generations)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
