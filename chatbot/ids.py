"""Session and conversation ids: 128 bits from the OS CSPRNG, base64url."""

from __future__ import annotations

import re
import secrets

_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def new_id() -> str:
    return secrets.token_urlsafe(16)


def valid(raw: str) -> bool:
    return _ID.fullmatch(raw) is not None
