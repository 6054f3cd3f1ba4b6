"""The one interface every AI provider implements, and the choice of provider from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

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


class Provider(Protocol):
    name: str

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Reasoning | Finish]:
        """Yield answer text as `str` and thinking as `Reasoning`, then one Finish; or raise ProviderError."""
        ...

    async def aclose(self) -> None: ...
