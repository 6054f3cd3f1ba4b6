"""Generation tasks: each streams one provider answer into its session's Redis stream.

The process owns every task here: `Producers.close()` cancels and awaits them.
Writes are coalesced: at most one append is in flight per session, and text
that arrives meanwhile joins the next entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from . import events, history
from .metrics import Metrics
from .providers import Finish, Message, Provider, ProviderError
from .store import Store

log = logging.getLogger(__name__)


class _Ended(Exception):
    """The store refused an append: the session ended elsewhere (cancelled, orphaned) or expired."""


class _Writer:
    """Coalesces one session's text into as few appends as the store's pace allows."""

    RETRIES = 8  # about 5 s of backoff: rides out a Redis restart or failover

    def __init__(self, store: Store, session_id: str, on_cancel: asyncio.Event, metrics: Metrics) -> None:
        self._store = store
        self._sid = session_id
        self._on_cancel = on_cancel
        self._metrics = metrics
        self._pending: list[str] = []
        self._inflight: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self.entries = 0
        self.stored: list[str] = []  # the text appended so far, for the conversation's history

    def add(self, text: str) -> None:
        if self._inflight is not None and self._inflight.done():
            self._inflight.result()  # surfaces _Ended or a store failure to the generation loop
            self._inflight = None
        self._pending.append(text)
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            text, pieces = "".join(self._pending), len(self._pending)
            self._pending.clear()
            await self._append(events.TOKEN, events.token_data(text))
            self.stored.append(text)
            if self.entries == 1:
                self._metrics.ttft.observe(time.monotonic() - self._started)
            self._metrics.tokens_relayed.inc(pieces)

    async def _append(self, event: str, data: str, terminal_status: str = "") -> None:
        for attempt in range(self.RETRIES):
            try:
                result = await self._store.append(self._sid, event, data, terminal_status=terminal_status)
                break
            except (RedisError, OSError) as exc:
                if attempt == self.RETRIES - 1:
                    raise
                log.warning("session %s: append failed (%s); retrying", self._sid, exc)
                await asyncio.sleep(min(1.0, 0.1 * 2**attempt))
        if result.ended:
            raise _Ended
        self.entries += 1
        if result.cancel_requested:
            self._on_cancel.set()

    async def drain(self) -> None:
        """Wait until every added text is stored."""
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task
        if self._pending:
            await self._flush()

    async def finish(self, event: str, data: str, status: str) -> None:
        await self.drain()
        await self._append(event, data, status)

    async def abandon(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._inflight


class Producers:
    """This process's generation tasks, their leases and their cancellation."""

    def __init__(
        self, store: Store, provider: Provider, metrics: Metrics, *, lease_ttl: float, max_events: int
    ) -> None:
        self._store = store
        self._provider = provider
        self._metrics = metrics
        self._lease_ttl = lease_ttl
        self._max_events = max_events
        self.accepting = True
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._lease_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._lease_task = asyncio.create_task(self._keep_leases(), name="producer-leases")

    @property
    def active(self) -> int:
        return len(self._tasks)

    def spawn(self, session_id: str, messages: Sequence[Message], *, conversation_id: str | None = None) -> None:
        """Start generating; with a conversation id, the turn joins that conversation's history when it ends."""
        cancel = self._cancels[session_id] = asyncio.Event()
        task = asyncio.create_task(
            self._generate(session_id, messages, cancel, conversation_id), name=f"generate-{session_id}"
        )
        self._tasks[session_id] = task
        task.add_done_callback(lambda _: self._forget(session_id))

    async def drain(self, grace_seconds: float) -> None:
        """Take no new answers and give the running ones up to `grace_seconds` to finish."""
        self.accepting = False
        tasks = list(self._tasks.values())
        if tasks:
            log.info("draining %d answers for up to %.0fs", len(tasks), grace_seconds)
            await asyncio.wait(tasks, timeout=grace_seconds)

    def _forget(self, session_id: str) -> None:
        self._tasks.pop(session_id, None)
        self._cancels.pop(session_id, None)

    def cancel(self, session_id: str) -> None:
        """Stop a local generation because a user asked (from any instance)."""
        if (flag := self._cancels.get(session_id)) is not None:
            flag.set()

    async def close(self) -> None:
        """Stop generating: each unfinished answer ends with a retryable error, then tasks are awaited."""
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _generate(
        self, session_id: str, messages: Sequence[Message], cancel: asyncio.Event, conversation_id: str | None
    ) -> None:
        writer = _Writer(self._store, session_id, cancel, self._metrics)
        turn = (conversation_id, messages[-1].content)
        outcome = "failed"
        try:
            finish = await self._relay(messages, writer, cancel)
            await writer.drain()
            await self._remember(*turn, writer)
            await writer.finish(events.DONE, events.done_data(finish.finish_reason, _usage(finish)), _status(finish))
            outcome = finish.finish_reason
        except _Ended:
            outcome = "ended_elsewhere"
        except ProviderError as exc:
            outcome = f"upstream_error:{exc.code}"
            self._metrics.upstream_errors.labels(exc.code).inc()
            log.warning("session %s: provider error %s: %s", session_id, exc.code, exc.message)
            with contextlib.suppress(_Ended, RedisError, OSError):
                await asyncio.wait_for(writer.drain(), 2.0)
            await self._remember(*turn, writer)
            await self._end_with_error(writer, exc.code, exc.message, retryable=exc.retryable)
        except asyncio.CancelledError:
            outcome = "server_shutdown"
            await self._end_with_error(
                writer, "server_shutdown", "The server stopped before the answer was complete.", retryable=True
            )
            raise
        except (RedisError, OSError) as exc:
            outcome = "store_unavailable"
            self._metrics.redis_errors.labels("producer").inc()
            log.error("session %s: store unavailable, answer abandoned: %s", session_id, exc)
        except Exception:
            outcome = "internal_error"
            log.exception("session %s: generation failed", session_id)
            await self._end_with_error(writer, "internal_error", "The answer failed on the server.", retryable=True)
        finally:
            await writer.abandon()
            self._metrics.sessions.labels(outcome.partition(":")[0]).inc()
            log.info(
                "session %s outcome %s entries %d",
                session_id,
                outcome,
                writer.entries,
                extra={"session_id": session_id, "outcome": outcome, "entries": writer.entries},
            )

    async def _relay(self, messages: Sequence[Message], writer: _Writer, cancel: asyncio.Event) -> Finish:
        """Run the copy loop until the answer ends, or stop it when a cancel arrives."""
        relay = asyncio.create_task(self._copy(messages, writer))
        waiter = asyncio.create_task(cancel.wait())
        try:
            await asyncio.wait({relay, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        if relay.cancelled():
            return Finish("cancelled")
        return relay.result()

    async def _copy(self, messages: Sequence[Message], writer: _Writer) -> Finish:
        """The per-delta hot path: nothing here but a type check and a list append."""
        stream = self._provider.stream(messages)
        try:
            async for item in stream:
                if isinstance(item, Finish):
                    return item
                if item:
                    writer.add(item)
                    if writer.entries >= self._max_events:
                        return Finish("length")
            return Finish("stop")
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _remember(self, conversation_id: str | None, message: str, writer: _Writer) -> None:
        """Add the turn to the history before the terminal event, so a reader who saw it can go on at once."""
        text = "".join(writer.stored)
        if not text or conversation_id is None:
            return  # an answer with no text teaches the next turn nothing, and some APIs reject it
        try:
            await self._store.append_turn(conversation_id, history.Turn(message, text))
        except (RedisError, OSError) as exc:
            log.warning("conversation %s: history not saved: %s", conversation_id, exc)

    async def _end_with_error(self, writer: _Writer, code: str, message: str, *, retryable: bool) -> None:
        with contextlib.suppress(_Ended, RedisError, OSError, asyncio.CancelledError):
            await asyncio.wait_for(
                writer.finish(events.ERROR, events.error_data(code, message, retryable=retryable), "failed"), 2.0
            )

    async def _keep_leases(self) -> None:
        interval = max(0.05, self._lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            sids = list(self._tasks)
            if not sids:
                continue
            try:
                flags = await self._store.renew_leases(sids)
            except (RedisError, OSError) as exc:
                self._metrics.redis_errors.labels("lease").inc()
                log.warning("lease renewal failed: %s", exc)
                continue
            for sid, flag in flags.items():
                if flag == "1":
                    self.cancel(sid)  # a cancel notice may be lost; the flag is not


def _status(finish: Finish) -> str:
    return "cancelled" if finish.finish_reason == "cancelled" else "done"


def _usage(finish: Finish) -> dict[str, int] | None:
    if finish.usage is None:
        return None
    return {"input_tokens": finish.usage.input_tokens, "output_tokens": finish.usage.output_tokens}
