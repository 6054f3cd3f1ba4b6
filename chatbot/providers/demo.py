"""The offline demo provider: deterministic plain prose built from the message, at a set pace."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from collections.abc import AsyncIterator, Sequence

from . import Finish, Message, Usage

_OPENERS = (
    "Here is how I would think about “{topic}”.",
    "Good question about “{topic}”.",
    "There are a few things worth saying about “{topic}”.",
    "Let me walk through “{topic}” step by step.",
)
_SENTENCES = (
    "The answer depends on what you need first and how much time you can spend on it.",
    "A small working version usually teaches more than a long plan, and it is easier to change.",
    "Start with the part that people touch, then measure it and keep what works.",
    "Most projects stumble on the plain details, such as errors, retries and limits, rather than on ideas.",
    "Write down each decision and the reason for it, so that the next person can follow along.",
    "Streaming an answer keeps readers engaged, because they see progress while the rest is being written.",
    "It helps to name the one number that tells you whether things got better.",
    "When two options look equal, pick the one that is easier to undo.",
    "Try the simplest approach on real data before reaching for a clever one.",
    "Expect the first version to be wrong in a few places, and plan a second pass.",
    "Ask someone who will use it to watch you try it; their questions show what is missing.",
    "Keep the moving parts few, and make each of them easy to observe.",
    "If something fails, it should fail loudly and say what to do next.",
    "A short checklist beats a long document that nobody reads.",
    "Small steps that each leave things working add up faster than one big leap.",
    "Once it works, look at what it costs, and only then make it fast.",
)


def demo_answer(message: str, tokens: int) -> list[str]:
    """The exact deltas the demo streams for a message: same message, same answer."""
    seed = int.from_bytes(hashlib.sha256(message.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    rng = random.Random(seed)
    topic = " ".join(message.split()[:6]) or "this"
    words = rng.choice(_OPENERS).format(topic=topic).split()
    sentences = itertools.cycle(rng.sample(_SENTENCES, len(_SENTENCES)))
    while len(words) < tokens:
        words.extend(next(sentences).split())
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
