"""A conversation's history: its turns, how each is stored, and the messages a model receives. Pure, no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .providers import Message


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


def messages(system_prompt: str, turns: Sequence[Turn], message: str) -> list[Message]:
    """What the model receives: the system prompt, the earlier turns in order, the new message."""
    out = [Message("system", system_prompt)] if system_prompt else []
    for turn in turns:
        out += (Message("user", turn.user), Message("assistant", turn.assistant))
    out.append(Message("user", message))
    return out
