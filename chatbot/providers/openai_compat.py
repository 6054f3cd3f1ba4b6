"""Any OpenAI-compatible Chat Completions endpoint (OpenAI, Ollama, vLLM, llama.cpp, LM Studio, OpenRouter, Groq).

The official SDK sends the request (OPENAI_API_KEY, OPENAI_BASE_URL, retries,
error classes); the streamed body is parsed here, straight off the socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletionChunk

from . import Finish, FinishReason, Message, ProviderError, Reasoning, Sink, Usage, failures
from .sse_decoder import loads as json_loads
from .transport import LINGER_SECONDS, HttpTransport, RawBody, event_stream, items, relay_body, take_body

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
        self._max_tokens = max_output_tokens
        self._transport = HttpTransport()
        self._client = openai.AsyncOpenAI(
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
        # The SDK's generic `post` (its documented way to send a body as is): the same base URL, auth,
        # retries and error classes as `chat.completions.create`, without `create`'s walk of every message
        # against the params' TypedDicts, which was half of the SDK's CPU per answer (bench/RESULTS.md).
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._max_tokens is not None:
            body["max_tokens"] = self._max_tokens
        try:
            sent = await self._client.post(
                "/chat/completions",
                cast_to=ChatCompletionChunk,
                body=body,
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
        except openai.APIError as exc:
            raise _failure(exc) from exc
        # Only the body is kept while the answer streams: the SDK's stream and the httpx2 request and response
        # with their headers are 7 KB an answer (bench/RESULTS.md, memory per answer).
        return take_body(sent.response)

    async def relay(self, messages: Sequence[Message], sink: Sink) -> Finish:
        raw = await self._send(messages)
        linger = 0.0
        try:
            finish = await relay_body(await event_stream(raw), ChunkParser(), sink)
            linger = LINGER_SECONDS  # ended normally: the body's last bytes may still keep the connection
            return finish
        finally:
            await raw.aclose(linger)

    async def aclose(self) -> None:
        await self._client.close()


_REASONS: dict[str, FinishReason] = {
    "length": "length",
    "max_tokens": "length",
    "content_filter": "content_filter",
}
_TEXT_PARTS = frozenset({"text", "output_text"})
_THINKING_PARTS = frozenset({"thinking", "reasoning", "reasoning_text"})


class ChunkParser:
    """Chat Completions chunks → text and reasoning; the finish reason and usage end the answer.

    Read from every shape the OpenAI-compatible servers send: `delta.content` as a string or as a list of
    parts (Mistral), `delta.reasoning_content` (DeepSeek, vLLM, LiteLLM) or `delta.reasoning` (OpenRouter,
    Ollama, newer vLLM), an `error` object with or without `choices` (OpenRouter, LiteLLM, vLLM), Azure's
    chunks without choices. Anything of another type is `upstream_bad_response`.
    """

    __slots__ = ("ended", "mixed", "reason", "usage")

    def __init__(self) -> None:
        self.reason: FinishReason = "stop"
        self.usage: Usage | None = None
        self.ended = False
        self.mixed = False

    def finish(self) -> Finish:
        return Finish(self.reason, self.usage)

    def take(self, events: list[bytes], out: list[str | Reasoning]) -> Finish | None:
        loads = json_loads
        for data in events:
            if data == b"[DONE]":
                return Finish(self.reason, self.usage)
            event = loads(data)
            if type(event) is not dict:
                raise _bad("a chunk that is not a JSON object", data)
            if event.get("error") is not None:
                raise _stream_error(event["error"])
            if event.get("object") == "error":  # vLLM's error response, sent as a chunk
                raise _stream_error(event)
            choices = event.get("choices")
            if choices:
                if type(choices) is not list or type(choices[0]) is not dict:
                    raise _bad("`choices` that is not a list of objects", data)
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    if type(delta) is not dict:
                        raise _bad("a `delta` that is not an object", data)
                    thinking = delta.get("reasoning_content") or delta.get("reasoning")
                    if thinking:
                        if type(thinking) is not str:
                            raise _bad("reasoning that is not a string", data)
                        out.append(Reasoning(thinking))
                        self.mixed = True
                    text = delta.get("content")
                    if text:
                        if type(text) is str:
                            out.append(text)
                        else:
                            self._parts(text, out, data)
                reason = choice.get("finish_reason")
                if reason:
                    self._end(reason, event, data)
            usage = event.get("usage")
            if usage:
                self.usage = _usage(usage, data)
        return None

    def _parts(self, parts: Any, out: list[str | Reasoning], data: bytes) -> None:
        """`content` as a list of parts: text parts are the answer, thinking parts reasoning, in order."""
        if type(parts) is not list:
            raise _bad("`content` that is neither a string nor a list of parts", data)
        for part in parts:
            kind = part.get("type") if type(part) is dict else None
            if kind in _TEXT_PARTS and type(part.get("text")) is str:
                out.append(part["text"])
            elif kind in _THINKING_PARTS:
                text = _thinking_text(part.get(kind) if kind in part else part.get("text"))
                if text is None:
                    raise _bad(f"a {kind} part without text", data)
                out.append(Reasoning(text))
                self.mixed = True
            else:
                raise _bad("a content part that is neither text nor thinking", data)

    def _end(self, reason: Any, event: dict[str, Any], data: bytes) -> None:
        if type(reason) is not str:
            raise _bad("a `finish_reason` that is not a string", data)
        if reason == "error":
            raise _stream_error(event.get("error") or "finish_reason error")
        self.reason = _REASONS.get(reason, "stop")  # stop, eos, tool_calls, function_call, …
        self.ended = True


def _thinking_text(value: Any) -> str | None:
    """A thinking part's text: a string, or a list of text parts (Mistral's Magistral)."""
    if type(value) is str:
        return value
    if type(value) is list and all(type(p) is dict and type(p.get("text")) is str for p in value):
        return "".join(p["text"] for p in value)
    return None


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _usage(raw: Any, data: bytes) -> Usage:
    if type(raw) is not dict:
        raise _bad("`usage` that is not an object", data)
    return Usage(input_tokens=_count(raw.get("prompt_tokens")), output_tokens=_count(raw.get("completion_tokens")))


def _bad(what: str, data: bytes) -> ProviderError:
    log.warning("the upstream sent %s: %r", what, data[:500])
    return failures.unreadable(what)


def _stream_error(raw: Any) -> ProviderError:
    log.warning("the upstream reported an error mid-answer: %r", raw)
    return failures.in_band(raw)


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
