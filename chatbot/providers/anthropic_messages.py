"""Anthropic's Messages streaming API.

The official SDK sends the request (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL,
retries, error classes); the streamed events are parsed here, straight off the socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import anthropic
import httpx2
from anthropic.types import MessageParam

from . import Finish, FinishReason, Message, ProviderError, Usage, failures
from .transport import AiohttpTransport, raw_body, relay_body

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
# The Messages API requires a limit; this one applies when CHATBOT_MAX_OUTPUT_TOKENS is not set.
DEFAULT_MAX_TOKENS = 4096
_LENGTH_REASONS = frozenset({"max_tokens", "model_context_window_exceeded"})
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
        self._transport = AiohttpTransport()
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=httpx2.Timeout(idle_timeout, connect=CONNECT_TIMEOUT_SECONDS),
            http_client=httpx2.AsyncClient(transport=self._transport, trust_env=False),
        )

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [cast(MessageParam, {"role": m.role, "content": m.content}) for m in messages if m.role != "system"]
        async with contextlib.AsyncExitStack() as stack:
            request = self._client.messages.with_streaming_response.create(
                model=self._model,
                max_tokens=self._max_tokens,
                messages=turns,
                stream=True,
                system=system or anthropic.omit,
            )
            try:
                response = await stack.enter_async_context(request)
            except anthropic.APIError as exc:
                raise _failure(exc) from exc
            async for item in relay_body(raw_body(response.http_response), EventParser()):
                yield item

    async def aclose(self) -> None:
        await self._client.close()


class EventParser:
    """Messages stream events → text; remembers the stop reason and usage until `message_stop`."""

    __slots__ = ("input_tokens", "output_tokens", "reason")

    def __init__(self) -> None:
        self.reason: FinishReason = "stop"
        self.input_tokens: int | None = None
        self.output_tokens = 0

    def take(self, events: list[bytes], texts: list[str]) -> Finish | None:
        loads = json.loads
        for data in events:
            event = loads(data)
            kind = event["type"]
            if kind == "content_block_delta":
                delta = event["delta"]
                if delta.get("type") == "text_delta":
                    texts.append(delta["text"])
            elif kind == "message_start":
                self._count(event["message"].get("usage"))
            elif kind == "message_delta":
                if event["delta"].get("stop_reason") in _LENGTH_REASONS:
                    self.reason = "length"
                self._count(event.get("usage"))
            elif kind == "message_stop":
                return Finish(self.reason, self._usage())
            elif kind == "error":
                raise _stream_error(event.get("error") or {})
        return None

    def _count(self, usage: Any) -> None:
        if not usage:
            return
        if usage.get("input_tokens") is not None:
            # Cached prompt tokens are counted apart by the API; the prompt is all of them.
            self.input_tokens = sum(
                int(usage.get(k) or 0)
                for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            )
        if usage.get("output_tokens") is not None:
            self.output_tokens = int(usage["output_tokens"])  # cumulative, per the API

    def _usage(self) -> Usage | None:
        if self.input_tokens is None:
            return None
        return Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens)


def _stream_error(raw: Any) -> ProviderError:
    log.warning("the upstream reported an error mid-answer: %r", raw)
    return failures.failure(_ERROR_CODES.get(raw.get("type"), failures.ERROR))


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
