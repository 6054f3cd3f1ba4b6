"""Anthropic's Messages streaming API.

The official SDK sends the request (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL,
retries, error classes); the streamed events are parsed here, straight off the socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import anthropic
import httpx2
from anthropic.types import MessageParam

from . import Finish, FinishReason, Message, ProviderError, Reasoning, Sink, Usage, failures
from .sse_decoder import loads as json_loads
from .transport import LINGER_SECONDS, HttpTransport, RawBody, event_stream, items, relay_body, take_body

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
# The Messages API requires a limit; this one applies when CHATBOT_MAX_OUTPUT_TOKENS is not set.
DEFAULT_MAX_TOKENS = 4096
_ERROR_CODES = {
    "overloaded_error": failures.UNAVAILABLE,
    "api_error": failures.UNAVAILABLE,
    "rate_limit_error": failures.RATE_LIMITED,
    "timeout_error": failures.TIMEOUT,
}


class AnthropicProvider:
    """Streams text deltas of a Messages answer, then a Finish with the stop reason and the usage."""

    name = "anthropic"

    def __init__(
        self,
        *,
        model: str,
        idle_timeout: float,
        max_retries: int,
        max_output_tokens: int | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> None:
        self._model = model
        self._max_tokens = max_output_tokens or DEFAULT_MAX_TOKENS
        self._transport = HttpTransport()
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=httpx2.Timeout(idle_timeout, connect=CONNECT_TIMEOUT_SECONDS),
            http_client=httpx2.AsyncClient(transport=self._transport, trust_env=False),
        )

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
        return items(lambda sink: self.relay(messages, sink))

    async def _send(self, messages: Sequence[Message]) -> RawBody:
        """The request, sent by the SDK; the body of its answer, once the status says it is streaming."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [cast(MessageParam, {"role": m.role, "content": m.content}) for m in messages if m.role != "system"]
        try:
            sent = await self._client.messages.create(
                model=self._model,
                max_tokens=self._max_tokens,
                messages=turns,
                stream=True,
                system=system or anthropic.omit,
            )
        except anthropic.APIError as exc:
            raise _failure(exc) from exc
        # The SDK returns once the status is known and has not read the body. Only the body is kept while the
        # answer streams, not the SDK's stream nor httpx2's request and response (as in openai_compat).
        return take_body(sent.response)

    async def relay(self, messages: Sequence[Message], sink: Sink) -> Finish:
        raw = await self._send(messages)
        linger = 0.0
        try:
            finish = await relay_body(await event_stream(raw), EventParser(), sink)
            linger = LINGER_SECONDS  # ended normally: the body's last bytes may still keep the connection
            return finish
        finally:
            await raw.aclose(linger)

    async def aclose(self) -> None:
        await self._client.close()


_STOP_REASONS: dict[str, FinishReason] = {
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


class EventParser:
    """Messages stream events → text and thinking; `message_delta`'s stop reason ends the answer.

    Text deltas are the answer, `thinking_delta`s reasoning; signatures, tool input and citations carry
    nothing shown. An `error` event ends the answer with the error's code and message.
    """

    __slots__ = ("ended", "input_tokens", "mixed", "output_tokens", "reason")

    def __init__(self) -> None:
        self.reason: FinishReason = "stop"
        self.input_tokens: int | None = None
        self.output_tokens = 0
        self.ended = False
        self.mixed = False

    def finish(self) -> Finish:
        return Finish(self.reason, self._usage())

    def take(self, events: list[bytes], out: list[str | Reasoning]) -> Finish | None:
        loads = json_loads
        for data in events:
            event = loads(data)
            if type(event) is not dict:
                raise _bad("an event that is not a JSON object", data)
            kind = event.get("type")
            if kind == "content_block_delta":
                delta = _object(event.get("delta"), "a `delta` that is not an object", data)
                dtype = delta.get("type")
                if dtype == "text_delta":
                    out.append(_string(delta.get("text"), data))
                elif dtype == "thinking_delta":
                    out.append(Reasoning(_string(delta.get("thinking"), data)))
                    self.mixed = True
            elif kind == "content_block_start":
                block = _object(event.get("content_block"), "a `content_block` that is not an object", data)
                if block.get("type") == "text" and block.get("text"):
                    out.append(_string(block["text"], data))
                elif block.get("type") == "thinking" and block.get("thinking"):
                    out.append(Reasoning(_string(block["thinking"], data)))
                    self.mixed = True
            elif kind == "message_start":
                message = _object(event.get("message"), "a `message` that is not an object", data)
                self._count(message.get("usage"), data)
            elif kind == "message_delta":
                delta = _object(event.get("delta"), "a `delta` that is not an object", data)
                reason = delta.get("stop_reason")
                if reason is not None:
                    if type(reason) is not str:
                        raise _bad("a `stop_reason` that is not a string", data)
                    self.reason = _STOP_REASONS.get(reason, "stop")  # end_turn, stop_sequence, tool_use, …
                    self.ended = True
                self._count(event.get("usage"), data)
            elif kind == "message_stop":
                return self.finish()
            elif kind == "error":
                raise _stream_error(event.get("error"))
        return None

    def _count(self, usage: Any, data: bytes) -> None:
        if not usage:
            return
        if type(usage) is not dict:
            raise _bad("`usage` that is not an object", data)
        if usage.get("input_tokens") is not None:
            # Cached prompt tokens are counted apart by the API; the prompt is all of them.
            self.input_tokens = sum(
                _int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            )
        if usage.get("output_tokens") is not None:
            self.output_tokens = _int(usage["output_tokens"])  # cumulative, per the API

    def _usage(self) -> Usage | None:
        if self.input_tokens is None:
            return None
        return Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens)


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _object(value: Any, what: str, data: bytes) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(what, data)
    return value


def _string(value: Any, data: bytes) -> str:
    if type(value) is not str:
        raise _bad("text that is not a string", data)
    return value


def _bad(what: str, data: bytes) -> ProviderError:
    log.warning("the upstream sent %s: %r", what, data[:500])
    return failures.unreadable(what)


def _stream_error(raw: Any) -> ProviderError:
    log.warning("the upstream reported an error mid-answer: %r", raw)
    if type(raw) is dict and raw.get("type") in _ERROR_CODES:
        said = raw.get("message")
        return failures.failure(_ERROR_CODES[raw["type"]], said if type(said) is str else "")
    return failures.in_band(raw)


def _failure(exc: anthropic.APIError) -> ProviderError:
    """The SDK's verdict on a request that got no answer, after its retries."""
    log.warning("upstream request failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, anthropic.APITimeoutError):
        return failures.failure(failures.TIMEOUT)
    if isinstance(exc, anthropic.APIStatusError):
        return failures.for_status(exc.status_code)
    if isinstance(exc, anthropic.APIConnectionError):
        return failures.failure(failures.UNAVAILABLE)
    return failures.failure(failures.BAD_RESPONSE)
