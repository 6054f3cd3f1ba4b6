"""The one interface every AI provider implements, and the choice of provider from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


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

    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        """Yield text deltas as the model produces them, then at most one Finish."""
        ...

    async def aclose(self) -> None: ...
