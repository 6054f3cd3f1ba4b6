"""Liveness, readiness and the API description."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from .appkeys import FAULTS, METRICS, PRODUCERS, STORE
from .problems import Problem

OPENAPI = Path(__file__).with_name("openapi.yaml")
READY_TIMEOUT = 1.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if faults := request.app[FAULTS]:
        detail = f"A shared task of this instance ended unexpectedly ({', '.join(faults)}); it is restarting."
        raise Problem(503, "faulted", "Service Unavailable", detail)
    if not request.app[PRODUCERS].accepting:
        raise Problem(503, "draining", "Service Unavailable", "This instance is shutting down.")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[STORE].ping()
    except (RedisError, OSError, TimeoutError):
        raise Problem(503, "not-ready", "Service Unavailable", "The session store does not answer.") from None
    return web.json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].exposition(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )
