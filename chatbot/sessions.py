"""HTTP handlers for sessions: create, read, cancel. Thin: parse, call the domain, respond."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, NoReturn

from aiohttp import web

from . import events, history, ids
from .appkeys import KNOWLEDGE, METRICS, PRODUCERS, SETTINGS, STORE
from .knowledge.retriever import Retrieval
from .limits import client_address
from .problems import Problem
from .producer import Draining


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"{raw[:20]} does not fit a 64-bit float")
    return value


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise Problem(415, "unsupported-media-type", "Unsupported Media Type", "Send the body as application/json.")
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "body-too-large", "Content Too Large", f"The body must be at most {limit} bytes.")
    raw = await request.read()  # aiohttp enforces client_max_size for bodies without a length
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise Problem(400, "invalid-encoding", "Bad Request", "The body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise Problem(400, "invalid-json", "Bad Request", "The body is not valid JSON.") from None


def _invalid(detail: str) -> Problem:
    return Problem(422, "invalid-field", "Unprocessable Content", detail)


def _message(body: Any, max_chars: int) -> str:
    if not isinstance(body, dict):
        raise _invalid("The body must be a JSON object.")
    message = body.get("message")
    if not isinstance(message, str):
        raise _invalid("`message` is required and must be a string.")
    if not message.strip():
        raise _invalid("`message` must not be empty or blank.")
    if len(message) > max_chars:
        raise _invalid(f"`message` must be at most {max_chars} characters.")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("`message` contains an unpaired surrogate.") from None
    return message


async def _conversation_id(request: web.Request, body: dict[str, Any]) -> str:
    cid = body.get("conversation_id")
    if cid is None:
        return ids.new_id()
    if not isinstance(cid, str) or not ids.valid(cid):
        raise _invalid("`conversation_id` must be the conversation_id of an earlier answer.")
    if not await request.app[STORE].conversation_exists(cid):
        raise Problem(404, "unknown-conversation", "Not Found", "That conversation does not exist or has expired.")
    return cid


async def create(request: web.Request) -> web.Response:
    body = await _json_body(request)
    message = _message(body, request.app[SETTINGS].max_message_chars)
    conversation_id = await _conversation_id(request, body)
    try:
        with request.app[PRODUCERS].admission():
            session_id = await _start(request, body, message, conversation_id)
    except Draining:
        raise Problem(
            503,
            "draining",
            "Service Unavailable",
            "This instance is shutting down; retry.",
            headers={"Retry-After": "1"},
        ) from None
    events_url = f"/events/{session_id}"
    return web.json_response(
        {"id": session_id, "conversation_id": conversation_id, "events_url": events_url},
        status=201,
        headers={"Location": f"/sessions/{session_id}"},
    )


async def _start(request: web.Request, body: dict[str, Any], message: str, conversation_id: str) -> str:
    """Store the new session and spawn its producer; its id."""
    await _rate_limit(request)
    store = request.app[STORE]
    turns = await store.history(conversation_id) if "conversation_id" in body else []
    found = await _knowledge(request, message, turns)
    session_id = ids.new_id()
    messages = history.messages(
        request.app[SETTINGS].system_prompt, turns, message, knowledge=None if found is None else found.passages
    )
    sources = [] if found is None else found.sources
    producers = request.app[PRODUCERS]
    slot, waited = await producers.start_slot()
    try:
        if waited:
            # A burst of new sessions: this one is stored, and its POST answered, before its upstream request,
            # so that its reader can be there when the first token comes (ARCHITECTURE.md, "A new session").
            await store.create_session(session_id, conversation_id, message)
            producers.spawn(session_id, messages, conversation_id=conversation_id, sources=sources, slot=slot)
            return session_id
        # The producer sends its upstream request first, and the session is stored while the upstream
        # answers; the producer writes nothing before `stored` is set, and drops the answer if the session
        # could not be stored.
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        producers.spawn(
            session_id, messages, conversation_id=conversation_id, sources=sources, stored=stored, slot=slot
        )
        try:
            await slot.given_back()
            await store.create_session(session_id, conversation_id, message)
        except BaseException:
            stored.cancel()
            raise
        stored.set_result(None)
    except BaseException:
        slot.free()
        raise
    return session_id


async def _knowledge(request: web.Request, message: str, turns: list[history.Turn]) -> Retrieval | None:
    """The site's passages for this message and the conversation's last two questions; None when off."""
    knowledge = request.app[KNOWLEDGE]
    if knowledge is None:
        return None
    return await knowledge.retrieve(message, [turn.user for turn in turns[-2:]])


async def _rate_limit(request: web.Request) -> None:
    """Sessions per client address per window, counted in Redis so that every instance shares it."""
    settings = request.app[SETTINGS]
    if settings.rate_limit == 0:
        return
    address = client_address(request, settings.trusted_proxies)
    hits, resets_in = await request.app[STORE].count_hit(address, settings.rate_window_seconds)
    if hits > settings.rate_limit:
        request.app[METRICS].rejected.labels("rate").inc()
        raise Problem(
            429, "rate-limited", "Too Many Requests",
            f"At most {settings.rate_limit} new answers per {settings.rate_window_seconds}s from one client.",
            headers={"Retry-After": str(max(1, int(resets_in + 0.999)))},
        )  # fmt: skip


def session_id(request: web.Request) -> str:
    """The path's session id; a malformed one can only be unknown."""
    sid = request.match_info["session_id"]
    if not ids.valid(sid):
        raise not_found()
    return sid


def not_found() -> Problem:
    return Problem(404, "unknown-session", "Not Found", "No such session, or it has expired.")


async def read(request: web.Request) -> web.Response:
    sid = session_id(request)
    store = request.app[STORE]
    meta = await store.session(sid)
    if meta is None:
        raise not_found()
    found = await store.transcript(sid)
    body = {"id": sid, "conversation_id": meta.conversation_id, "status": meta.status, "text": found.text}
    return web.json_response({**body, "reasoning": found.reasoning, "sources": found.sources})


async def cancel(request: web.Request) -> web.Response:
    sid = session_id(request)
    outcome = await request.app[STORE].request_cancel(sid, events.done_data("cancelled"))
    if outcome == "unknown":
        raise not_found()
    if outcome == "requested":
        request.app[PRODUCERS].cancel(sid)  # spares the pub/sub hop when this instance generates it
    return web.json_response({"id": sid, "cancel": outcome}, status=202)
