"""Upstream failures as the ProviderErrors readers see: a code that says what happened, and whether to retry.

Messages are ours, never the upstream's: its error bodies can quote keys,
account names or internals. The upstream's own words go to the log.
"""

from __future__ import annotations

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
_RETRYABLE = frozenset({RATE_LIMITED, UNAVAILABLE, TIMEOUT, DISCONNECTED, BAD_RESPONSE, ERROR})


def failure(code: str) -> ProviderError:
    return ProviderError(code, _MESSAGES[code], retryable=code in _RETRYABLE)


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
