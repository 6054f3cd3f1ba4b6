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
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from . import events, history
from .metrics import Metrics
from .providers import Finish, Message, Provider, ProviderError, relay
from .store import AppendResult, Store, transient
from .tasks import shared_task_ended

log = logging.getLogger(__name__)


class _Ended(Exception):
    """The store refused an append: the session ended elsewhere (cancelled, orphaned) or expired."""


EMPTY_ANSWER = "empty_answer"

# How long an answer waits out a Redis outage (a restart, a failover) before it is abandoned.
OUTAGE_SECONDS = 30.0
# The pause before an entry that failed alone (its cluster master failing over) is sent again.
RETRY_SECONDS = 0.1


class _Full(Exception):
    """The answer has as many entries as a session may hold (CHATBOT_MAX_EVENTS): it ends with `length`."""


class _Broken(Exception):
    """This session's entries could not be sent (a fault of its own data or a bug); the traceback is logged."""


class _Writer:
    """One session's text and reasoning on their way to the store: coalesced, at most one append in flight.

    Entries travel through the process's `_Batcher`; the terminal event is appended directly. Consecutive
    deltas of one kind join one entry; a change of kind starts the next, so the order is kept.
    """

    def __init__(
        self,
        store: Store,
        batcher: _Batcher,
        session_id: str,
        on_cancel: asyncio.Future[None],
        metrics: Metrics,
        *,
        held: bool = False,
        max_entries: int = 1 << 62,
        reasoning: bool = True,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self.sid = session_id
        self._on_cancel = on_cancel
        self._metrics = metrics
        self._max_entries = max_entries
        self._reasoning = reasoning  # False: the model's thinking is dropped here
        self._kind = events.TOKEN  # the kind of the run in _pending
        self._pending: list[str] = []
        self._runs: list[tuple[str, str]] = []  # closed runs before _pending: (event, text)
        self._in_doubt = False  # _runs[0] is an entry whose append may have landed: it goes again as it was
        self._pieces = 0  # provider deltas waiting, for the tokens-relayed counter
        # queued for, or inside, a batch; also while `held`: text waits until `release()` (the session is stored)
        self._flying = held
        self._drained: asyncio.Future[None] | None = None  # made when something waits for `_flying` to end
        self._outage_since: float | None = None
        self._started = time.monotonic()
        self._output_seen = False  # for time to first token
        self.error: BaseException | None = None
        self.entries = 0
        self.stored: list[str] = []  # the answer text appended so far, for the conversation's history

    def add(self, text: str) -> None:
        """A provider's text delta (the `Sink` of providers): raises _Ended, _Broken or the store's error
        once this answer cannot go on, and _Full once it holds `max_entries` entries."""
        if self._kind is not events.TOKEN:
            self._switch(events.TOKEN)
        self._add(text)

    def add_reasoning(self, text: str) -> None:
        if not self._reasoning:
            return
        if self._kind is not events.REASONING:
            self._switch(events.REASONING)
        self._add(text)

    def _add(self, text: str) -> None:
        if self.error is not None:
            raise self.error  # _Ended, _Broken, or the store failed for longer than an outage may last
        self._pending.append(text)
        self._pieces += 1
        if not self._flying:
            self._flying = True
            self._batcher.schedule(self)
        if self.entries >= self._max_entries:
            raise _Full

    @property
    def first(self) -> bool:
        """No text or reasoning of this answer is stored yet: its next entry is its first output."""
        return not self._output_seen

    def _switch(self, kind: str) -> None:
        if self._pending:
            self._runs.append((self._kind, "".join(self._pending)))
            self._pending.clear()
        self._kind = kind

    def release(self) -> None:
        """Start sending the text held since the writer was made `held` (its session is stored now)."""
        self._flying = bool(self._pending or self._runs)
        if self._flying:
            self._batcher.schedule(self)

    def take(self) -> tuple[list[tuple[str, str]], int]:
        """The next entry, as [(event, text)], and how many deltas it joins; called by the batcher.

        One entry per session per batch: the store checks each append against the session's last id, which a
        second entry in the same round trip could not know. Runs of one kind join, except an entry in doubt:
        the store recognises a retry only if it carries the same event and data as the try that landed.
        """
        self._switch(self._kind)
        kind, text = self._runs[0]
        joined = 1
        while not self._in_doubt and joined < len(self._runs) and self._runs[joined][0] == kind:
            text += self._runs[joined][1]
            joined += 1
        del self._runs[:joined]
        self._in_doubt = False
        pieces, self._pieces = self._pieces, 0
        return [(kind, text)], pieces

    def landed(self, entries: list[tuple[str, str]], pieces: int, results: list[AppendResult | Exception]) -> None:
        """The batcher's answers for this writer's entries, one each."""
        for i, ((event, text), result) in enumerate(zip(entries, results, strict=True)):
            if isinstance(result, Exception) and transient(result):
                # Only this session's entries failed (on a cluster, its master is failing over): again shortly.
                if self.bounced(entries[i:], pieces if i == 0 else 0, result):
                    asyncio.get_running_loop().call_later(RETRY_SECONDS, self._batcher.schedule, self)
                return
            if isinstance(result, Exception) or result.ended:
                self._fail(result if isinstance(result, Exception) else _Ended())
                return
            self.entries += 1
            if event == events.TOKEN:
                self.stored.append(text)
            if not self._output_seen:  # the first token or reasoning, not an earlier `sources` entry
                self._output_seen = True
                self._metrics.ttft.observe(time.monotonic() - self._started)
            if result.cancel_requested:
                _raise_flag(self._on_cancel)
        self._outage_since = None
        self._metrics.tokens_relayed.inc(pieces)
        if self._pending or self._runs:
            self._batcher.schedule(self)
        else:
            self._landed_all()

    def bounced(self, entries: list[tuple[str, str]], pieces: int, exc: Exception) -> bool:
        """The batch failed as a whole: put the entries back in front; False once the outage lasted too long."""
        now = time.monotonic()
        self._outage_since = self._outage_since or now
        if now - self._outage_since > OUTAGE_SECONDS:
            self._fail(exc)
            return False
        self._runs[:0] = entries
        self._in_doubt = True
        self._pieces += pieces
        return True

    def broken(self, exc: BaseException) -> None:
        """This writer's entries failed for a reason of their own; the batcher has logged the traceback."""
        self._fail(_Broken(f"{type(exc).__name__}: {exc}"))

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._pending.clear()
        self._runs.clear()
        self._landed_all()
        _raise_flag(self._on_cancel)  # stops the copy loop now rather than at its next delta

    def _landed_all(self) -> None:
        self._flying = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def _until_idle(self) -> None:
        """Until nothing is queued for, or inside, a batch."""
        while self._flying:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def drain(self) -> None:
        """Wait until every added text is stored."""
        await self._until_idle()
        if self.error is not None:
            raise self.error

    async def put(self, event: str, data: str) -> None:
        """Append one non-token event ahead of any text (the answer's `sources`)."""
        result = await _retrying(self.sid, lambda: self._store.append(self.sid, event, data))
        if result.ended:
            raise _Ended
        self.entries += 1

    async def finish(self, event: str, data: str, status: str) -> None:
        """Append the terminal event once the entries before it are settled; _Ended if the session ended."""
        await self._until_idle()
        if isinstance(self.error, _Ended):
            raise self.error
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


# Per writer: the writer, its entries (event, text), how many deltas they join, the store items they became.
_Batch = list[tuple[_Writer, list[tuple[str, str]], int, list[tuple[str, str, str]]]]


class StartSlot:
    """One of `Producers.start_slot`'s places; `free` gives it to the next in line (once; later calls do nothing)."""

    __slots__ = ("_freed", "_starts")

    def __init__(self, starts: asyncio.Semaphore) -> None:
        self._starts: asyncio.Semaphore | None = starts
        self._freed: asyncio.Future[None] | None = None  # made by `given_back`, for a caller that waits

    def free(self) -> None:
        if self._starts is not None:
            self._starts.release()
            self._starts = None
            if self._freed is not None and not self._freed.done():
                self._freed.set_result(None)

    async def given_back(self) -> None:
        """Return once the slot is free: the answer's upstream request is on its way, or the answer ended."""
        if self._starts is None:
            return
        if self._freed is None:
            self._freed = asyncio.get_running_loop().create_future()
        await self._freed  # cancelled with its caller; `free` then has nothing to set


class _Batcher:
    """Sends every session's pending text in one round trip per batch, at most one batch per `interval`.

    While a batch is out, each session's new text collects in its writer and goes in the next batch, and
    the next batch starts no sooner than `interval` seconds after the last one started: idle, a token is
    written at once; under load, the cost of a round trip (the Redis client's per-call work, a socket
    write and read here and in Redis, bench/RESULTS.md) is paid once per batch instead of once per
    session, and the batches grow with the load rather than with the round trip's speed. An answer's
    first text or reasoning does not wait: a writer that has stored none yet ends the wait at once, so the
    time to first token does not grow under load.
    """

    def __init__(self, store: Store, metrics: Metrics, *, interval: float = 0.0) -> None:
        self._store = store
        self._metrics = metrics
        self._interval = interval
        self._queue: dict[str, _Writer] = {}
        self._wake = asyncio.Event()
        self._pause: asyncio.Future[None] | None = None  # the wait between two batches, while it lasts
        self._urgent = False  # a writer with its first output is queued
        self._task: asyncio.Task[None] | None = None

    def start(self, on_end: Callable[[asyncio.Task[None]], None]) -> None:
        self._task = asyncio.create_task(self._run(), name="producer-batcher")
        self._task.add_done_callback(on_end)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # an end of its own was logged when it happened

    def schedule(self, writer: _Writer) -> None:
        self._queue[writer.sid] = writer
        self._wake.set()
        if writer.first:
            self._urgent = True
            if self._pause is not None:
                _raise_flag(self._pause)

    async def _until(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Wait until loop time `when`, or until a writer with its first output is queued."""
        self._pause = pause = loop.create_future()
        timer = loop.call_at(when, _raise_flag, pause)
        try:
            await pause
        finally:
            timer.cancel()
            self._pause = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        sent_at = -self._interval
        while True:
            await self._wake.wait()
            if not self._urgent and loop.time() < sent_at + self._interval:
                await self._until(loop, sent_at + self._interval)
            sent_at = loop.time()
            self._urgent = False
            self._wake.clear()
            writers = list(self._queue.values())
            self._queue.clear()
            try:
                if await self._send(writers):
                    delay = 0.05
                    continue
            except Exception:
                # A bug here must not end the process's only writer: fail this batch's sessions, go on.
                log.exception("a batch of %d sessions failed", len(writers))
                for writer in writers:
                    writer.broken(RuntimeError("batch failed"))
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _send(self, writers: list[_Writer]) -> bool:
        """One round trip for every writer's entries; False if Redis failed and the entries went back."""
        batch: _Batch = []
        for writer in writers:
            try:
                entries, pieces = writer.take()
                items = [(writer.sid, event, _entry_data(event, text)) for event, text in entries]
            except Exception as exc:
                log.exception("session %s: its entries cannot be stored", writer.sid)
                writer.broken(exc)
                continue
            batch.append((writer, entries, pieces, items))
        try:
            results = await self._store.append_many([item for *_, items in batch for item in items])
        except (RedisError, OSError) as exc:
            self._metrics.redis_errors.labels("producer").inc()
            log.warning("appending %d sessions' entries failed (%s); retrying", len(batch), exc)
            for writer, entries, pieces, _ in batch:
                if writer.bounced(entries, pieces, exc):
                    self.schedule(writer)
            return False
        except Exception:
            # One session's entries broke the whole pipeline (say, text Redis cannot encode): send each apart.
            await self._send_apart(batch)
            return True
        at = 0
        for writer, entries, pieces, items in batch:
            self._land(writer, entries, pieces, results[at : at + len(items)])
            at += len(items)
        return True

    async def _send_apart(self, batch: _Batch) -> None:
        for writer, entries, pieces, items in batch:
            try:
                results = await self._store.append_many(items)
            except (RedisError, OSError) as exc:
                if writer.bounced(entries, pieces, exc):
                    self.schedule(writer)
                continue
            except Exception as exc:
                log.exception("session %s: its entries cannot be stored", writer.sid)
                writer.broken(exc)
                continue
            self._land(writer, entries, pieces, results)

    def _land(
        self, writer: _Writer, entries: list[tuple[str, str]], pieces: int, results: list[AppendResult | Exception]
    ) -> None:
        try:
            writer.landed(entries, pieces, results)
        except Exception as exc:
            log.exception("session %s: the store's answer could not be applied", writer.sid)
            writer.broken(exc)


def _raise_flag(flag: asyncio.Future[None]) -> None:
    if not flag.done():
        flag.set_result(None)


def _entry_data(event: str, text: str) -> str:
    return events.token_data(text) if event == events.TOKEN else events.reasoning_data(text)


class Draining(Exception):
    """This process is shutting down and takes no new answer."""


class Producers:
    """This process's generation tasks, their leases and their cancellation."""

    def __init__(
        self,
        store: Store,
        provider: Provider,
        metrics: Metrics,
        *,
        lease_ttl: float,
        max_events: int,
        deadline: float = 600.0,
        reasoning: bool = True,
        on_fatal: Callable[[str], None] = lambda name: None,
        batch_interval: float = 0.0,
        starts_at_once: int = 8,
    ) -> None:
        self._store = store
        self._provider = provider
        self._metrics = metrics
        self._lease_ttl = lease_ttl
        self._max_events = max_events
        self._deadline = deadline
        self._reasoning = reasoning
        self._on_fatal = on_fatal
        self._closing = False
        self.accepting = True
        self._admitting = 0  # sessions between `admission()` and their spawn
        self._admitted = asyncio.Event()  # set when _admitting falls to 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._starts = asyncio.Semaphore(starts_at_once)  # `start_slot`
        # Per answer, a future done once it must stop (a cancel, or its writer failed): `_relay` waits on it
        # beside the copy task, with no task or `asyncio.Event` of its own (memory per answer, bench/RESULTS.md).
        self._cancels: dict[str, asyncio.Future[None]] = {}
        self._lease_task: asyncio.Task[None] | None = None
        self._batcher = _Batcher(store, metrics, interval=batch_interval)
        # Told (session id, True) when an answer starts here and (id, False) when it ends: the hub's
        # follow_cancel, so that on a cluster this process hears that session's own cancel notices.
        self.on_generating: Callable[[str, bool], None] = lambda session_id, generating: None

    async def start(self) -> None:
        self._batcher.start(self._task_ended)
        self._lease_task = asyncio.create_task(self._keep_leases(), name="producer-leases")
        self._lease_task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        shared_task_ended(task, closing=self._closing, on_fatal=self._on_fatal)

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def start_slot(self) -> tuple[StartSlot, bool]:
        """Wait, in arrival order, until fewer than `starts_at_once` answers are starting here: the slot, to
        be given to `spawn` (or freed with `StartSlot.free` if the answer never starts), and whether this
        call had to wait (a burst of new sessions) or got its slot at once.

        An answer is starting from its slot until its provider's request is on its way (the provider's first
        wait: for its upstream connection or answer), which is the CPU-heavy part of a start (the SDK building
        the request). So a burst of a hundred new sessions is started a few at a time, first come first
        served, instead of all a hundred a step at a time: the first visitors' answers begin at once instead
        of at the end of the burst, the last ones' about when they would have, and the tokens of the answers
        already running are not queued behind a hundred starts (bench/RESULTS.md).
        """
        waited = self._starts.locked()
        await self._starts.acquire()
        return StartSlot(self._starts), waited

    def spawn(
        self,
        session_id: str,
        messages: Sequence[Message],
        *,
        conversation_id: str | None = None,
        sources: Sequence[Mapping[str, str]] = (),
        stored: asyncio.Future[None] | None = None,
        slot: StartSlot | None = None,
    ) -> None:
        """Start generating; with a conversation id, the turn joins that conversation's history when it ends.

        `sources` ({"title", "url"} each), if any, are the answer's first event. With `stored`, the upstream
        request starts now but nothing is written until that future is done: its result says the session is
        stored; cancelling it says the session never will be, and the answer is dropped without a write.
        `slot` (from `start_slot`) is given back once the provider's request is on its way, or the answer ended first.
        """
        cancel = self._cancels[session_id] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._generate(session_id, messages, cancel, conversation_id, sources, stored, slot),
            name=f"generate-{session_id}",
        )
        self._tasks[session_id] = task
        self.on_generating(session_id, True)
        task.add_done_callback(lambda _: self._forget(session_id))

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Around a new session's store calls and its `spawn`: raises Draining once the drain began, and
        makes the drain wait for a session admitted before it (its client gets a 201 and an answer)."""
        if not self.accepting:
            raise Draining
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1
            if not self._admitting:
                self._admitted.set()

    async def drain(self, grace_seconds: float) -> None:
        """Take no new answers and give the running ones, and those being admitted, up to `grace_seconds`."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        if self._tasks or self._admitting:
            log.info("draining %d answers for up to %.0fs", len(self._tasks) + self._admitting, grace_seconds)
        while (left := deadline - loop.time()) > 0:
            if self._admitting:
                self._admitted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._admitted.wait(), left)
            elif self._tasks:
                await asyncio.wait(list(self._tasks.values()), timeout=left)
            else:
                return

    def _forget(self, session_id: str) -> None:
        self._tasks.pop(session_id, None)
        self._cancels.pop(session_id, None)
        self.on_generating(session_id, False)

    def cancel(self, session_id: str) -> None:
        """Stop a local generation because a user asked (from any instance)."""
        if (flag := self._cancels.get(session_id)) is not None:
            _raise_flag(flag)

    async def close(self) -> None:
        """Stop generating: each unfinished answer ends with a retryable error, then tasks are awaited."""
        self._closing = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.wait({self._lease_task})  # an end of its own was logged when it happened
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._batcher.close()  # last: the cancelled answers' final writes go through it

    async def _generate(
        self,
        session_id: str,
        messages: Sequence[Message],
        cancel: asyncio.Future[None],
        conversation_id: str | None,
        sources: Sequence[Mapping[str, str]],
        stored: asyncio.Future[None] | None,
        slot: StartSlot | None,
    ) -> None:
        writer = _Writer(
            self._store,
            self._batcher,
            session_id,
            cancel,
            self._metrics,
            held=stored is not None,
            max_entries=self._max_events,
            reasoning=self._reasoning,
        )
        # The upstream request starts now, while the session may still be on its way to the store: its text
        # waits in the held writer (time to first token: bench/RESULTS.md).
        copy = asyncio.create_task(self._copy(messages, writer, slot), name=f"copy-{session_id}")
        if stored is not None and not await _until_stored(stored, copy):
            return
        turn = (conversation_id, messages[-1].content)
        outcome = "failed"
        try:
            if sources:
                await writer.put(events.SOURCES, events.sources_data(sources))
            writer.release()
            finish = await self._relay(copy, cancel)
            await writer.drain()
            if finish.finish_reason in ("stop", "length") and not "".join(writer.stored).strip():
                raise ProviderError(EMPTY_ANSWER, "The AI provider's answer had no text.", retryable=True)
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
        except _Broken:
            outcome = "internal_error"  # the batcher logged the traceback when it happened
            await self._end_with_error(writer, "internal_error", "The answer failed on the server.", retryable=True)
        except (RedisError, OSError) as exc:
            outcome = "store_unavailable"
            self._metrics.redis_errors.labels("producer").inc()
            log.error("session %s: store unavailable, answer abandoned: %s", session_id, exc)
        except Exception:
            outcome = "internal_error"
            log.exception("session %s: generation failed", session_id)
            await self._end_with_error(writer, "internal_error", "The answer failed on the server.", retryable=True)
        finally:
            if slot is not None:
                slot.free()  # the answer ended before its request went (its copy loop never ran, or failed at once)
            if not copy.done():  # the answer ended before its copy loop was let run (the store failed)
                copy.cancel()
                await asyncio.wait({copy})
            log.info(
                "session %s outcome %s entries %d",
                session_id,
                outcome,
                writer.entries,
                extra={"session_id": session_id, "outcome": outcome, "entries": writer.entries},
            )
            self._metrics.sessions.labels(outcome.partition(":")[0]).inc()

    async def _relay(self, relay: asyncio.Task[Finish], cancel: asyncio.Future[None]) -> Finish:
        """Let the copy loop run until the answer ends, or stop it when a cancel arrives."""
        try:
            either: set[asyncio.Future[Any]] = {relay, cancel}
            await asyncio.wait(either, timeout=self._deadline, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        if relay.cancelled():
            if not cancel.done():
                raise ProviderError(
                    "upstream_timeout", f"The answer took longer than {self._deadline:g}s and was cut.", retryable=True
                )
            return Finish("cancelled")
        return relay.result()

    async def _copy(self, messages: Sequence[Message], writer: _Writer, slot: StartSlot | None) -> Finish:
        """The answer into its writer: a push provider calls `writer.add` from the upstream connection's
        own read callback (no task wakes up per delta). Anything a pulled provider yields that is not str,
        Reasoning or Finish is a bug that fails this answer (internal_error), never the shared writer.
        The start `slot` is given back once the provider first waits: its request is built and on its way."""
        if slot is not None:
            asyncio.get_running_loop().call_soon(slot.free)
        try:
            return await relay(self._provider, messages, writer)
        except _Full:
            return Finish("length")

    async def _remember(self, conversation_id: str | None, message: str, writer: _Writer) -> None:
        """Add the turn to the history before the terminal event, so a reader who saw it can go on at once."""
        text = "".join(writer.stored)
        if not text or conversation_id is None:
            return  # an answer with no text teaches the next turn nothing, and some APIs reject it
        try:
            await self._store.append_turn(conversation_id, writer.sid, history.Turn(message, text))
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
                for sid, flag in flags.items():
                    if flag == "1":
                        self.cancel(sid)  # a cancel notice may be lost; the flag is not
            except (RedisError, OSError) as exc:
                self._metrics.redis_errors.labels("lease").inc()
                log.warning("lease renewal failed: %s", exc)
            except Exception:
                # Leases lapse if this task ends, and every answer here would be declared lost.
                log.exception("lease renewal of %d sessions failed", len(sids))


async def _until_stored(stored: asyncio.Future[None], copy: asyncio.Task[Finish]) -> bool:
    """Wait for the session to be stored: True once it is; False, with `copy` stopped, if it never will be.

    Raises CancelledError, with `copy` stopped, when this task itself is cancelled meanwhile.
    """
    try:
        await asyncio.shield(stored)  # a cancel of this task must not be taken for the store's answer
        return True
    except asyncio.CancelledError:
        copy.cancel()
        await asyncio.wait({copy})
        if not copy.cancelled():
            copy.exception()  # it ended before the cancel (say, the upstream refused): nothing to report
        if stored.cancelled() and not _cancelling():
            return False
        raise


def _cancelling() -> int:
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def _status(finish: Finish) -> str:
    return "cancelled" if finish.finish_reason == "cancelled" else "done"


def _usage(finish: Finish) -> dict[str, int] | None:
    if finish.usage is None:
        return None
    return {"input_tokens": finish.usage.input_tokens, "output_tokens": finish.usage.output_tokens}
