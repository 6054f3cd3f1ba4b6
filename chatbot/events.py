"""Events of an answer and their Server-Sent Events wire format: pure functions, no I/O."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOKEN = "token"
REASONING = "reasoning"  # the model's thinking: stored and resumable like tokens, never answer text
SOURCES = "sources"  # at most once per answer, before its first token
DONE = "done"
ERROR = "error"
TERMINAL = frozenset({DONE, ERROR})

SEP = b"\r\n"  # one line separator for every byte of a response

_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_ID_PART = 2**64 - 1


class BadEventId(ValueError):
    """A Last-Event-ID that is not a stream id of the form `<ms>-<seq>`."""


def parse_event_id(raw: str) -> tuple[int, int]:
    """Stream id → comparable tuple; raises BadEventId for anything else."""
    match = _EVENT_ID.fullmatch(raw)
    if match is None:
        raise BadEventId(raw)
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_ID_PART or seq > _MAX_ID_PART:
        raise BadEventId(raw)
    return ms, seq


def entry_key(raw: str) -> tuple[int, int]:
    """An id Redis gave to an entry (never a client's: see `parse_event_id`) → comparable tuple.

    Without `parse_event_id`'s checks, which the hub's per-entry comparisons paid for nothing (3% of the
    service's samples at 10,000 tokens/s, bench/RESULTS.md).
    """
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a session's stream. `data` is already one line of JSON."""

    id: str
    event: str
    data: str

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL

    def payload(self) -> Any:
        return json.loads(self.data)


def token_data(text: str) -> str:
    """`{"text": ...}`, exactly as `_dumps` writes it, without its dict walk: one per entry on the hot path."""
    return '{"text":' + _json_string(text) + "}"


def reasoning_data(text: str) -> str:
    return '{"text":' + _json_string(text) + "}"


def sources_data(sources: Sequence[Mapping[str, str]]) -> str:
    """`{"sources": [{"title", "url"}, ...]}`: the pages an answer's passages came from, best first."""
    return _dumps({"sources": [{"title": s["title"], "url": s["url"]} for s in sources]})


def done_data(finish_reason: str, usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {"finish_reason": finish_reason}
    if usage is not None:
        body["usage"] = usage
    return _dumps(body)


def error_data(code: str, message: str, *, retryable: bool) -> str:
    return _dumps({"code": code, "message": message, "retryable": retryable})


# The str encoder json.dumps(ensure_ascii=False) itself uses (the C one when available).
_json_string = json.encoder.encode_basestring


def _dumps(body: dict[str, Any]) -> str:
    # ensure_ascii=False keeps text as the model wrote it; json never emits a raw
    # CR or LF inside a string, so the result is always exactly one SSE data line.
    # U+2028/U+2029 are legal in SSE data and in JSON, so they pass through unescaped.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def frame(event: Event) -> bytes:
    """The exact bytes of one SSE event, encoded once and shared by every reader."""
    if "\r" in event.id or "\n" in event.id or "\0" in event.id:
        raise ValueError("event id must not contain line breaks or NUL")
    if "\r" in event.event or "\n" in event.event:
        raise ValueError("event name must not contain line breaks")
    if "\r" in event.data or "\n" in event.data:
        raise ValueError("event data must be a single line")
    return b"".join(
        (
            b"id: ", event.id.encode(), SEP,
            b"event: ", event.event.encode(), SEP,
            b"data: ", event.data.encode(), SEP,
            SEP,
        )
    )  # fmt: skip


def retry_field(milliseconds: int) -> bytes:
    """The `retry:` line that sets the reconnection delay.

    No blank line follows: the field is processed when it is read, and a block without data that ends in
    a blank line makes some clients (httpx-sse) dispatch an empty event.
    """
    if milliseconds < 0:
        raise ValueError("retry must not be negative")
    return b"retry: " + str(milliseconds).encode() + SEP


def comment(text: str) -> bytes:
    """One comment line (ignored by every client; for people reading the wire), no blank line after it."""
    if "\r" in text or "\n" in text:
        raise ValueError("a comment must be a single line")
    return b": " + text.encode() + SEP
