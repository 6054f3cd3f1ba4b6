"""RFC 9457 problem details: the one place where failures become HTTP responses."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from .appkeys import METRICS
from .store import StoreUnavailable

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://chatbot.invalid/problems/"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed its connection first

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def response(problem: Problem, instance: str) -> web.Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": instance,
    }
    return web.Response(
        status=problem.status,
        body=json.dumps(body).encode(),
        content_type=CONTENT_TYPE,
        headers={"Cache-Control": "no-store", **problem.headers},
    )


def _from_http_error(exc: web.HTTPException) -> Problem:
    slug = {
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
        415: "unsupported-media-type",
    }.get(exc.status, f"http-{exc.status}")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return Problem(exc.status, slug, exc.reason, exc.text or exc.reason, headers=headers)


def _client_left(request: web.Request) -> None:
    request.app[METRICS].client_disconnects.labels("before_response").inc()
    log.debug("client left before the response to %s %s", request.method, request.path)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return response(problem, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return response(_from_http_error(exc), request.path)
    except ConnectionResetError:
        # The client left before its answer could be written: routine, and no fault of the store.
        _client_left(request)
        return web.Response(status=CLIENT_CLOSED_REQUEST)  # never reaches anyone; seen in the access log
    except asyncio.CancelledError:
        # aiohttp cancels a handler whose client left while it read the body; count it, never swallow it.
        if request.transport is None or request.transport.is_closing():
            _client_left(request)
        raise
    except (StoreUnavailable, RedisError, ConnectionError, TimeoutError) as exc:
        log.warning("store unavailable on %s %s: %s", request.method, request.path, exc)
        return response(
            Problem(503, "store-unavailable", "Service Unavailable", "The session store is not reachable; retry.",
                    headers={"Retry-After": "1"}),
            request.path,
        )  # fmt: skip
