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
from collections.abc import Awaitable, Callable, Mapping, Sequence

from redis.exceptions import RedisError

from . import events, history
from .metrics import Metrics
from .providers import Finish, Message, Provider, ProviderError
from .store import AppendResult, Store, transient

log = logging.getLogger(__name__)


class _Ended(Exception):
    """The store refused an append: the session ended elsewhere (cancelled, orphaned) or expired."""


# How long an answer waits out a Redis outage (a restart, a failover) before it is abandoned.
OUTAGE_SECONDS = 30.0
# The pause before an entry that failed alone (its cluster master failing over) is sent again.
RETRY_SECONDS = 0.1


class _Writer:
    """One session's text on its way to the store: coalesced, at most one append in flight.

    Tokens travel through the process's `_Batcher`; the terminal event is appended directly.
    """

    def __init__(
        self, store: Store, batcher: _Batcher, session_id: str, on_cancel: asyncio.Event, metrics: Metrics
    ) -> None:
        self._store = store
        self._batcher = batcher
        self.sid = session_id
        self._on_cancel = on_cancel
        self._metrics = metrics
        self._pending: list[str] = []
        self._pieces = 0  # provider deltas in _pending, for the tokens-relayed counter
        self._flying = False  # queued for, or inside, a batch
        self._idle = asyncio.Event()
        self._idle.set()
        self._outage_since: float | None = None
        self._started = time.monotonic()
        self.error: BaseException | None = None
        self.entries = 0
        self.stored: list[str] = []  # the text appended so far, for the conversation's history

    def add(self, text: str) -> None:
        if self.error is not None:
            raise self.error  # _Ended, or the store failed for longer than an outage may last
        self._pending.append(text)
        self._pieces += 1
        if not self._flying:
            self._flying = True
            self._idle.clear()
            self._batcher.schedule(self)

    def take(self) -> tuple[str, int]:
        """The pending text as one entry, and how many deltas it joins; called by the batcher."""
        text, pieces = "".join(self._pending), self._pieces
        self._pending.clear()
        self._pieces = 0
        return text, pieces

    def landed(self, text: str, pieces: int, result: AppendResult | Exception) -> None:
        """The batcher's answer for this writer's entry."""
        if isinstance(result, Exception) and transient(result):
            # Only this entry failed (on a cluster, its master is failing over): try it again shortly.
            if self.bounced(text, pieces, result):
                asyncio.get_running_loop().call_later(RETRY_SECONDS, self._batcher.schedule, self)
            return
        if isinstance(result, Exception) or result.ended:
            self._fail(result if isinstance(result, Exception) else _Ended())
            return
        self._outage_since = None
        self.entries += 1
        self.stored.append(text)
        if len(self.stored) == 1:
            self._metrics.ttft.observe(time.monotonic() - self._started)
        self._metrics.tokens_relayed.inc(pieces)
        if result.cancel_requested:
            self._on_cancel.set()
        if self._pending:
            self._batcher.schedule(self)
        else:
            self._flying = False
            self._idle.set()

    def bounced(self, text: str, pieces: int, exc: Exception) -> bool:
        """The batch failed as a whole: put the text back in front; False once the outage lasted too long."""
        now = time.monotonic()
        self._outage_since = self._outage_since or now
        if now - self._outage_since > OUTAGE_SECONDS:
            self._fail(exc)
            return False
        self._pending.insert(0, text)
        self._pieces += pieces
        return True

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._pending.clear()
        self._flying = False
        self._idle.set()

    async def drain(self) -> None:
        """Wait until every added text is stored."""
        await self._idle.wait()
        if self.error is not None:
            raise self.error

    async def put(self, event: str, data: str) -> None:
        """Append one non-token event ahead of any text (the answer's `sources`)."""
        result = await _retrying(self.sid, lambda: self._store.append(self.sid, event, data))
        if result.ended:
            raise _Ended
        self.entries += 1

    async def finish(self, event: str, data: str, status: str) -> None:
        await self.drain()
        result = await _retrying(self.sid, lambda: self._store.append(self.sid, event, data, terminal_status=status))
        if result.ended:
            raise _Ended
        self.entries += 1


async def _retrying(session_id: str, call: Callable[[], Awaitable[AppendResult]]) -> AppendResult:
    """Retry a store call through an outage of up to OUTAGE_SECONDS."""
    give_up = time.monotonic() + OUTAGE_SECONDS
    delay = 0.05
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            if time.monotonic() >= give_up:
                raise
            log.warning("session %s: append failed (%s); retrying", session_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


class _Batcher:
    """Sends every session's pending text in one pipeline per round trip.

    While a batch is out, each session's new text collects in its writer and goes in the next batch:
    idle, a token is written at once; under load, the per-command cost of the Redis client (the top of
    the profile in bench/RESULTS.md) is paid once per batch instead of once per session.
    """

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._queue: dict[str, _Writer] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="producer-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def schedule(self, writer: _Writer) -> None:
        self._queue[writer.sid] = writer
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            writers = list(self._queue.values())
            self._queue.clear()
            batch = [(writer, *writer.take()) for writer in writers]
            try:
                results = await self._store.append_many(
                    [(writer.sid, events.TOKEN, events.token_data(text)) for writer, text, _ in batch]
                )
            except (RedisError, OSError) as exc:
                self._metrics.redis_errors.labels("producer").inc()
                log.warning("appending %d entries failed (%s); retrying", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                for writer, text, pieces in batch:
                    if writer.bounced(text, pieces, exc):
                        self.schedule(writer)
                continue
            delay = 0.05
            for (writer, text, pieces), result in zip(batch, results, strict=True):
                writer.landed(text, pieces, result)


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
        self._batcher = _Batcher(store, metrics)
        # Told (session id, True) when an answer starts here and (id, False) when it ends: the hub's
        # follow_cancel, so that on a cluster this process hears that session's own cancel notices.
        self.on_generating: Callable[[str, bool], None] = lambda session_id, generating: None

    async def start(self) -> None:
        self._batcher.start()
        self._lease_task = asyncio.create_task(self._keep_leases(), name="producer-leases")

    @property
    def active(self) -> int:
        return len(self._tasks)

    def spawn(
        self,
        session_id: str,
        messages: Sequence[Message],
        *,
        conversation_id: str | None = None,
        sources: Sequence[Mapping[str, str]] = (),
    ) -> None:
        """Start generating; with a conversation id, the turn joins that conversation's history when it ends.

        `sources` ({"title", "url"} each), if any, are the answer's first event.
        """
        cancel = self._cancels[session_id] = asyncio.Event()
        task = asyncio.create_task(
            self._generate(session_id, messages, cancel, conversation_id, sources), name=f"generate-{session_id}"
        )
        self._tasks[session_id] = task
        self.on_generating(session_id, True)
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
        self.on_generating(session_id, False)

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
        await self._batcher.close()  # last: the cancelled answers' final writes go through it

    async def _generate(
        self,
        session_id: str,
        messages: Sequence[Message],
        cancel: asyncio.Event,
        conversation_id: str | None,
        sources: Sequence[Mapping[str, str]],
    ) -> None:
        writer = _Writer(self._store, self._batcher, session_id, cancel, self._metrics)
        turn = (conversation_id, messages[-1].content)
        outcome = "failed"
        try:
            if sources:
                await writer.put(events.SOURCES, events.sources_data(sources))
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
            log.info(
                "session %s outcome %s entries %d",
                session_id,
                outcome,
                writer.entries,
                extra={"session_id": session_id, "outcome": outcome, "entries": writer.entries},
            )
            self._metrics.sessions.labels(outcome.partition(":")[0]).inc()

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
