"""The one interface every AI provider implements, and the choice of provider from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "content_filter", "cancelled"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Reasoning:
    """The model's thinking, streamed apart from its answer: a `reasoning` event, never answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The last item of an answer stream: why the model stopped and what it cost."""

    finish_reason: FinishReason = "stop"
    usage: Usage | None = None


class ProviderError(Exception):
    """An upstream failure, carried to readers as a terminal `error` event."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Sink(Protocol):
    """Where an answer's text goes as it arrives (the producer's writer). Either method may raise to stop
    the answer: the relay ends and raises that exception."""

    def add(self, text: str) -> None:
        """Answer text (never empty)."""
        ...

    def add_reasoning(self, text: str) -> None:
        """The model's thinking (never empty)."""
        ...


class Provider(Protocol):
    name: str

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
        """Yield answer text as `str` and thinking as `Reasoning`, then one Finish; or raise ProviderError."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class PushProvider(Provider, Protocol):
    """A provider that can also hand its text to a sink as it arrives, without a task wake-up per delta."""

    async def relay(self, messages: Sequence[Message], sink: Sink) -> Finish:
        """Give answer text and thinking to `sink`, then return the Finish; or raise ProviderError, or what
        `sink` raised."""
        ...


async def relay(provider: Provider, messages: Sequence[Message], sink: Sink) -> Finish:
    """One answer of `provider` into `sink`: pushed if the provider can (PushProvider), else pulled from
    `stream()`. An answer stream that ends without a Finish ends with `stop`. TypeError if the provider
    yields anything but str, Reasoning or Finish (a bug of the provider's)."""
    if isinstance(provider, PushProvider):
        return await provider.relay(messages, sink)
    stream = provider.stream(messages)
    try:
        async for item in stream:
            if type(item) is str:
                if item:
                    sink.add(item)
            elif isinstance(item, Finish):
                return item
            elif isinstance(item, Reasoning):
                if item.text:
                    sink.add_reasoning(item.text)
            else:
                raise TypeError(f"the provider yielded a {type(item).__name__}, not text")
        return Finish("stop")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
