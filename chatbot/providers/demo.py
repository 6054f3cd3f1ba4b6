"""The offline demo provider: deterministic plain prose built from the message, at a set pace."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Sequence

from . import Finish, Message, Usage

_OPENERS = (
    "Here is how I would think about",
    "A good way to look at",
    "There are a few things to say about",
    "Let me walk through",
)
_PROSE = (
    "the answer depends on what you need first and how much time you have to spend on it "
    "a small working version usually teaches more than a long plan and it is easier to change "
    "start with the part that users touch then measure it and keep what works "
    "most projects fail on the boring details such as errors retries and limits rather than on ideas "
    "write down the decision and the reason so that the next person can follow it "
    "streaming keeps people engaged because they see progress while the rest is still being written"
)
_WORDS = tuple(_PROSE.split())


def demo_answer(message: str, tokens: int) -> list[str]:
    """The exact deltas the demo streams for a message: same message, same answer."""
    seed = int.from_bytes(hashlib.sha256(message.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    rng = random.Random(seed)
    topic = " ".join(message.split()[:6]) or "this"
    words = [rng.choice(_OPENERS), *f"“{topic}”.".split()]
    while len(words) < tokens:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
    words = words[:tokens]
    return [words[0], *(" " + word for word in words[1:])]


class DemoProvider:
    """Streams `demo_answer` for the last user message at `tokens_per_second`."""

    name = "demo"

    def __init__(self, *, tokens_per_second: float, answer_tokens: int) -> None:
        self._delay = 1.0 / tokens_per_second
        self._tokens = answer_tokens

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str | Finish]:
        message = next((m.content for m in reversed(messages) if m.role == "user"), "")
        deltas = demo_answer(message, self._tokens)
        for delta in deltas:
            await asyncio.sleep(self._delay)
            yield delta
        yield Finish("stop", Usage(input_tokens=len(message.split()), output_tokens=len(deltas)))

    async def aclose(self) -> None:
        return None
