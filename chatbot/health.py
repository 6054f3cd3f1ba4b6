"""Liveness, readiness and the API description."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from .appkeys import STORE
from .problems import Problem

OPENAPI = Path(__file__).with_name("openapi.yaml")
READY_TIMEOUT = 1.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[STORE].ping()
    except (RedisError, OSError, TimeoutError):
        raise Problem(503, "not-ready", "Service Unavailable", "The session store does not answer.") from None
    return web.json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")
