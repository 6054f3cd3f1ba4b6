"""Upstream failures as the ProviderErrors readers see: a code that says what happened, and whether to retry.

Messages are ours. Where the upstream explains itself (an in-band error object, a body that is not an
event stream), a short, cleaned quote of what it sent follows ours: at most QUOTE_CHARS characters, control
characters dropped, anything shaped like a key or token redacted. Whole error bodies go to the log only.
"""

from __future__ import annotations

import re
from typing import Any

from . import ProviderError

AUTH = "upstream_auth"
RATE_LIMITED = "upstream_rate_limited"
UNAVAILABLE = "upstream_unavailable"
TIMEOUT = "upstream_timeout"
DISCONNECTED = "upstream_disconnected"
REJECTED = "upstream_rejected"
BAD_RESPONSE = "upstream_bad_response"
ERROR = "upstream_error"

_MESSAGES = {
    AUTH: "The AI provider refused the service's credentials.",
    RATE_LIMITED: "The AI provider is rate limiting requests; try again shortly.",
    UNAVAILABLE: "The AI provider is unavailable; try again shortly.",
    TIMEOUT: "The AI provider stopped responding.",
    DISCONNECTED: "The connection to the AI provider was lost before the answer was complete.",
    REJECTED: "The AI provider rejected the request.",
    BAD_RESPONSE: "The AI provider sent a response the service cannot read.",
    ERROR: "The AI provider reported an error during the answer.",
}
_RETRYABLE = frozenset({RATE_LIMITED, UNAVAILABLE, TIMEOUT, DISCONNECTED, ERROR})

QUOTE_CHARS = 200
# Long opaque runs (keys, tokens, signatures) and anything introduced as a key, token or bearer credential.
_SECRET = re.compile(
    r"(?i)\bbearer\s+\S+|\b(?:api[-_]?key|token|secret|password)\s*[:=]\s*\S+|\b(?:sk|pk|rk)-[\w-]{6,}|[\w+/=-]{32,}"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def failure(code: str, quote: str = "") -> ProviderError:
    """The error for `code`; `quote`, if any, is the upstream's own words, cleaned and shortened."""
    message = _MESSAGES[code]
    if quote:
        message = f"{message} It said: “{clean(quote)}”"
    return ProviderError(code, message, retryable=code in _RETRYABLE)


def clean(text: str) -> str:
    """Upstream text fit to show a visitor: one line, no control characters, no credentials, bounded."""
    text = _SECRET.sub("[redacted]", _CONTROL.sub(" ", text)).strip()
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…"


def for_status(status: int) -> ProviderError:
    """The failure for an HTTP status the SDK gave up on (after its own retries where they apply)."""
    if status in (401, 403):
        return failure(AUTH)
    if status == 429:
        return failure(RATE_LIMITED)
    if status in (408, 504):
        return failure(TIMEOUT)
    if status >= 500:
        return failure(UNAVAILABLE)
    return failure(REJECTED)


def for_read_error(exc: BaseException) -> ProviderError:
    """The failure for an error while reading an answer's body: a stall, or a lost connection."""
    if isinstance(exc, TimeoutError):  # aiohttp's idle (sock_read) timeout is one
        return failure(TIMEOUT)
    return failure(DISCONNECTED)


_RATE_WORDS = ("rate_limit", "rate limit", "ratelimit", "too many requests", "quota")
_BUSY_WORDS = ("overloaded", "unavailable", "capacity")


def in_band(error: Any) -> ProviderError:
    """An error object the upstream sent inside an answer's stream (any shape): its code and its message.

    `{"code": 429|"rate_limit_exceeded", "type": "rate_limit_error", ...}` → upstream_rate_limited;
    overloaded / 5xx → upstream_unavailable; 408/504 or a timeout type → upstream_timeout; else upstream_error.
    """
    if isinstance(error, dict):
        said = error.get("message")
        words = " ".join(str(error.get(k, "")) for k in ("code", "type", "status")).lower()
        status = _status(error.get("code"))
        status = status if status is not None else _status(error.get("status"))
    else:
        said, words, status = error, "", None
    said = said if isinstance(said, str) else ""
    words = f"{words} {said.lower()}"
    if status == 429 or any(w in words for w in _RATE_WORDS):
        code = RATE_LIMITED
    elif status in (408, 504) or "timeout" in words:
        code = TIMEOUT
    elif (status is not None and status >= 500) or any(w in words for w in _BUSY_WORDS):
        code = UNAVAILABLE
    else:
        code = ERROR
    return failure(code, said)


def unreadable(what: str) -> ProviderError:
    """An event whose JSON is not the API's shape; `what` names the part (ours, no upstream text)."""
    return ProviderError(BAD_RESPONSE, f"{_MESSAGES[BAD_RESPONSE][:-1]}: {what}.", retryable=False)


def _status(value: Any) -> int | None:
    """An HTTP status given as a number or a string of digits (LiteLLM sends "429")."""
    if type(value) is str and value.isdigit() and len(value) == 3:
        return int(value)
    return value if type(value) is int else None


def not_an_event_stream(content_type: str, first: bytes) -> ProviderError:
    """A 200 answer whose body is not Server-Sent Events (an HTML error page, bare JSON, a proxy's text)."""
    what = clean(content_type) or "no content type"
    shown = clean(first.decode("utf-8", "replace")) or "an empty body"
    message = f"The AI provider answered with {what} instead of an event stream, starting: “{shown}”"
    return ProviderError(BAD_RESPONSE, message, retryable=False)
