"""A conversation's history: its turns, how each is stored, and the messages a model receives. Pure, no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .knowledge.passages import Passage
from .providers import Message

GROUNDING = (
    "Answer from the passages of this site's own content below, quoted between <passage> tags. "
    "If they do not cover the question, say that the site does not say, rather than guessing."
)
NOTHING_FOUND = (
    "No passage of this site's own content matched this question: if the answer depends on the site, "
    "say that the site does not say, rather than guessing."
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange: what the user asked and what the model answered (so far, if it was cut short)."""

    user: str
    assistant: str

    @property
    def chars(self) -> int:
        return len(self.user) + len(self.assistant)


def encode(turn: Turn) -> str:
    # The character count leads, so the store's trimming script can weigh a turn without parsing JSON.
    return f"{turn.chars}\n" + json.dumps([turn.user, turn.assistant], ensure_ascii=False)


def decode(raw: str) -> Turn:
    user, assistant = json.loads(raw.partition("\n")[2])
    return Turn(user, assistant)


def grounding(passages: Sequence[Passage]) -> str:
    """The part of the system message that carries the site's passages (NOTHING_FOUND for none)."""
    if not passages:
        return NOTHING_FOUND
    quoted = [
        f'<passage title="{_attr(p.title)}" url="{_attr(p.url)}" section="{_attr(p.heading)}">\n{p.text}\n</passage>'
        for p in passages
    ]
    return "\n\n".join([GROUNDING, *quoted])


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("\n", " ")


def messages(
    system_prompt: str, turns: Sequence[Turn], message: str, *, knowledge: Sequence[Passage] | None = None
) -> list[Message]:
    """What the model receives: the system prompt (with the site's passages when `knowledge` is not None),
    the earlier turns in order, the new message."""
    system = "\n\n".join(part for part in (system_prompt, None if knowledge is None else grounding(knowledge)) if part)
    out = [Message("system", system)] if system else []
    for turn in turns:
        out += (Message("user", turn.user), Message("assistant", turn.assistant))
    out.append(Message("user", message))
    return out
