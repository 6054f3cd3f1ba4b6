"""The app factory: routes, middleware, and the resources the app owns."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import TypedDict

from aiohttp import web

from . import health, problems, sessions, sse
from .appkeys import CAPS, FAULTS, HUB, KNOWLEDGE, METRICS, PRODUCERS, SETTINGS, STORE
from .hub import Hub
from .knowledge.index import BadIndex
from .knowledge.retriever import Knowledge
from .limits import StreamCaps
from .metrics import Metrics
from .producer import Producers
from .providers import Provider
from .providers.demo import DemoProvider
from .settings import Settings, SettingsError
from .store import open_store
from .web import setup_web

log = logging.getLogger(__name__)


class _ProviderOptions(TypedDict):
    model: str
    idle_timeout: float
    max_retries: int
    max_output_tokens: int | None


def make_provider(settings: Settings) -> Provider:
    """The provider CHATBOT_PROVIDER names; the SDK-backed ones take their credentials from their own env vars."""
    if settings.provider == "demo":
        return DemoProvider(
            tokens_per_second=settings.demo_tokens_per_second, answer_tokens=settings.demo_answer_tokens
        )
    options: _ProviderOptions = {
        "model": settings.model,
        "idle_timeout": settings.upstream_idle_timeout_seconds,
        "max_retries": settings.upstream_max_retries,
        "max_output_tokens": settings.max_output_tokens,
    }
    if settings.provider == "openai":
        import openai

        from .providers.openai_compat import OpenAIProvider

        try:
            return OpenAIProvider(**options)
        except openai.OpenAIError as exc:
            raise SettingsError(f"OPENAI_API_KEY must be set for CHATBOT_PROVIDER=openai ({exc})") from None
    from .providers.anthropic_messages import AnthropicProvider

    return AnthropicProvider(**options)


def create_app(
    settings: Settings, *, provider: Provider | None = None, on_fatal: Callable[[], None] | None = None
) -> web.Application:
    """Build the service; `provider` overrides the one named in settings.

    Should a shared task end unexpectedly, its name joins `app[FAULTS]` (so /readyz answers 503) and
    `on_fatal` runs: `chatbot serve` passes one that stops the process with a non-zero status.
    """
    app = web.Application(middlewares=[problems.middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[FAULTS] = []

    def fatal(task_name: str) -> None:
        app[FAULTS].append(task_name)
        if on_fatal is not None:
            on_fatal()

    app[METRICS] = Metrics()
    app[CAPS] = StreamCaps(settings, app[METRICS])
    app[KNOWLEDGE] = open_knowledge(settings)
    app.on_cleanup.append(_close_knowledge)
    app.cleanup_ctx.append(_resources(provider or make_provider(settings), fatal))
    app.on_shutdown.append(_drain)
    app.router.add_post("/sessions", sessions.create)
    app.router.add_get("/sessions/{session_id}", sessions.read)
    app.router.add_post("/sessions/{session_id}/cancel", sessions.cancel)
    app.router.add_get("/events/{session_id}", sse.stream)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/openapi.yaml", health.openapi)
    app.router.add_get("/metrics", health.metrics)
    setup_web(app, settings)  # last: CORS covers the routes that exist now
    return app


def open_knowledge(settings: Settings) -> Knowledge | None:
    """The index CHATBOT_KNOWLEDGE names, open; None without the setting; SettingsError if it cannot be read."""
    if not settings.knowledge:
        return None
    try:
        return Knowledge(settings.knowledge, max_chars=settings.knowledge_max_chars)
    except BadIndex as exc:
        raise SettingsError(f"CHATBOT_KNOWLEDGE {settings.knowledge!r} cannot be read as an index: {exc}") from None


async def _close_knowledge(app: web.Application) -> None:
    if (knowledge := app[KNOWLEDGE]) is not None:
        knowledge.close()


def _resources(provider: Provider, fatal: Callable[[str], None]):  # type: ignore[no-untyped-def]
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        store = await open_store(settings, owner=owner)
        metrics = app[METRICS]
        producers = Producers(
            store,
            provider,
            metrics,
            lease_ttl=settings.lease_ttl_seconds,
            max_events=settings.max_answer_events,
            deadline=settings.answer_deadline_seconds,
            reasoning=settings.reasoning == "show",
            on_fatal=fatal,
            batch_interval=settings.write_batch_interval_ms / 1000,
            starts_at_once=settings.starts_at_once,
        )
        hub = Hub(
            store,
            metrics,
            lease_ttl=settings.lease_ttl_seconds,
            on_cancel=producers.cancel,
            # The producer's own deadline ends every answer before this; past it, the producer is wedged.
            queued_bound=settings.answer_deadline_seconds + 2 * settings.lease_ttl_seconds,
            on_fatal=fatal,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        producers.on_generating = hub.follow_cancel
        store.on_entry = hub.entry
        app[STORE], app[PRODUCERS], app[HUB] = store, producers, hub
        metrics.watch(open_streams=lambda: app[CAPS].open, active_generations=lambda: producers.active)
        await producers.start()
        await hub.start()
        try:
            yield
        finally:
            await producers.close()
            await hub.close()
            await provider.aclose()
            await store.close()

    return context


async def _drain(app: web.Application) -> None:
    """SIGTERM: aiohttp has stopped accepting; finish the answers in flight, then send readers elsewhere."""
    await app[PRODUCERS].drain(app[SETTINGS].shutdown_grace_seconds)
    app[HUB].end_streams()
