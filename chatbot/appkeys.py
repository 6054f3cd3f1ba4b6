"""Typed keys of the resources the app owns."""

from __future__ import annotations

from aiohttp import web

from .hub import Hub
from .producer import Producers
from .settings import Settings
from .store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
PRODUCERS = web.AppKey("producers", Producers)
