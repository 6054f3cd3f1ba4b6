"""Typed keys of the resources the app owns."""

from __future__ import annotations

from aiohttp import web

from .hub import Hub
from .knowledge.retriever import Knowledge
from .limits import StreamCaps
from .metrics import Metrics
from .producer import Producers
from .settings import Settings
from .store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
PRODUCERS = web.AppKey("producers", Producers)
METRICS = web.AppKey("metrics", Metrics)
CAPS = web.AppKey("caps", StreamCaps)
# Names of shared tasks that ended unexpectedly: /readyz answers 503, `chatbot serve` exits non-zero.
FAULTS = web.AppKey("faults", list[str])
KNOWLEDGE: web.AppKey[Knowledge | None] = web.AppKey("knowledge")
