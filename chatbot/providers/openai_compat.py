"""Any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama, vLLM, llama.cpp, LM Studio, OpenRouter, Groq).

The official SDK sends the request (OPENAI_API_KEY, OPENAI_BASE_URL, retries,
error classes); the streamed body is parsed here, straight off the socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

from . import Finish, FinishReason, Message, ProviderError, Usage, failures
from .transport import AiohttpTransport, raw_body, relay_body

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0


class OpenAIProvider:
    """Streams Chat Completions deltas, then a Finish with the finish reason and the reported usage."""

    name = "openai"

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
        self._max_tokens = openai.omit if max_output_tokens is None else max_output_tokens
        self._transport = AiohttpTransport()
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=httpx2.Timeout(idle_timeout, connect=CONNECT_TIMEOUT_SECONDS),
            http_client=httpx2.AsyncClient(transport=self._transport, trust_env=False),
        )

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        async with contextlib.AsyncExitStack() as stack:
            request = self._client.chat.completions.with_streaming_response.create(
                model=self._model,
                messages=[cast(ChatCompletionMessageParam, {"role": m.role, "content": m.content}) for m in messages],
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=self._max_tokens,
            )
            try:
                response = await stack.enter_async_context(request)
            except openai.APIError as exc:
                raise _failure(exc) from exc
            async for item in relay_body(raw_body(response.http_response), ChunkParser()):
                yield item

    async def aclose(self) -> None:
        await self._client.close()


class ChunkParser:
    """Chat Completions chunks → text; remembers the finish reason and usage until `[DONE]`."""

    __slots__ = ("reason", "usage")

    def __init__(self) -> None:
        self.reason: FinishReason = "stop"
        self.usage: Usage | None = None

    def take(self, events: list[bytes], texts: list[str]) -> Finish | None:
        loads = json.loads
        for data in events:
            if data == b"[DONE]":
                return Finish(self.reason, self.usage)
            event = loads(data)
            choices = event.get("choices")
            if choices:
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content")
                if text:
                    texts.append(text)
                if choice.get("finish_reason") == "length":
                    self.reason = "length"
            elif "error" in event:
                raise _stream_error(event["error"])
            if event.get("usage"):
                self.usage = _usage(event["usage"])
        return None


def _usage(raw: Any) -> Usage:
    return Usage(input_tokens=int(raw.get("prompt_tokens") or 0), output_tokens=int(raw.get("completion_tokens") or 0))


def _stream_error(raw: Any) -> ProviderError:
    log.warning("the upstream reported an error mid-answer: %r", raw)
    return failures.failure(failures.ERROR)


def _failure(exc: openai.APIError) -> ProviderError:
    """The SDK's verdict on a request that got no answer, after its retries."""
    log.warning("upstream request failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, openai.APITimeoutError):
        return failures.failure(failures.TIMEOUT)
    if isinstance(exc, openai.APIStatusError):
        return failures.for_status(exc.status_code)
    if isinstance(exc, openai.APIConnectionError):
        return failures.failure(failures.UNAVAILABLE)
    return failures.failure(failures.BAD_RESPONSE)
