"""What happens when one of the process's shared tasks ends while its owner is not closing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def shared_task_ended(task: asyncio.Task[None], *, closing: bool, on_fatal: Callable[[str], None]) -> None:
    """A shared task may only end in its owner's close(); any other end is logged at CRITICAL with its
    exception and reported by name to `on_fatal` (which makes /readyz answer 503 and `chatbot serve` exit)."""
    if closing:
        return
    exc = None if task.cancelled() else task.exception()
    log.critical("shared task %s ended unexpectedly", task.get_name(), exc_info=exc)
    on_fatal(task.get_name())
