"""The per-process reader: every open event stream of this process is served from here.

A live entry arrives with its append (produced here) or in its notice (produced elsewhere), each with the
id before it; it is delivered only if that id is the session's cursor, and otherwise the stream itself is
read (pipelined over all sessions that need it). Every (re)subscribe is followed by a re-read, so a lost
notice delays nothing for longer than a reconnect; nothing is ever taken from a notice across a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from . import events, keys
from .events import Event
from .eventstream import Heartbeats
from .metrics import Metrics
from .store import Notice, Store
from .tasks import shared_task_ended

log = logging.getLogger(__name__)


class StreamClosed(Exception):
    """The hub is shutting down; the reader should end its response so the client reconnects."""


Frames = list[tuple[Event, bytes]]


@dataclass(eq=False, slots=True)
class Subscriber:
    """One open event stream: batches the hub read for it, each with the id it was read after.

    While its handler waits with nothing queued (`sse._serve`, or `Hub.next_batch`), `direct` (set by the
    handler) writes the frames of non-terminal events straight into its socket: a live entry costs each reader one
    transport write, not a wake-up of its task. `direct` returns False when it cannot write at once (the
    socket's buffer is full, or it is closing); the frames are queued for the handler instead.

    A reader holds no queue and no `asyncio.Event` of its own while nothing is queued for it (about 1.6 KiB
    per open stream): `pending` is made on first use, and the handler waits on a future made for the wait.
    """

    session_id: str
    last_id: tuple[int, int]
    pending: deque[tuple[tuple[int, int], Frames]] | None = None
    queued: int = 0
    waiter: asyncio.Future[None] | None = None  # the handler's, while it waits for its next batch
    behind: bool = False
    closed: bool = False
    direct: Callable[[bytes, int], bool] | None = None
    last_sent: str = ""  # the id of the last event written by `direct`, once it has written one

    def offer(self, read_after: tuple[int, int], frames: Frames, limit: int) -> None:
        if (
            self.direct is not None
            and not self.pending
            and not self.behind
            and not self.closed
            and read_after <= self.last_id
            and self._write_now(frames)
        ):
            return
        if self.queued + len(frames) > limit:
            # A slow reader re-reads from Redis instead of growing memory without bound.
            self.behind = True
            self.pending = None
            self.queued = 0
        elif not self.behind:
            if self.pending is None:
                self.pending = deque()
            self.pending.append((read_after, frames))
            self.queued += len(frames)
        self.wake()

    def wake(self) -> None:
        """Make the handler look again (something was queued, or the stream must end)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake_to_close(self) -> None:
        """The peer is gone: the handler ends the stream."""
        self.closed = True
        self.wake()

    def _write_now(self, frames: Frames) -> bool:
        """Write the frames after `last_id` at once, unless one is terminal (the handler ends the stream)."""
        if len(frames) == 1:  # a live entry: the usual case, without the lists
            event, data = frames[0]
            key = events.entry_key(event.id)
            if key <= self.last_id:
                return True
            if event.terminal or self.direct is None or not self.direct(data, 1):
                return False
            self.last_id, self.last_sent = key, event.id
            return True
        fresh = [item for item in frames if events.entry_key(item[0].id) > self.last_id]
        if not fresh:
            return True  # all seen already
        if any(event.terminal for event, _ in fresh) or self.direct is None:
            return False
        data = fresh[0][1] if len(fresh) == 1 else b"".join(framed for _, framed in fresh)
        if not self.direct(data, len(fresh)):
            return False
        last = fresh[-1][0].id
        self.last_id = events.entry_key(last)
        self.last_sent = last
        return True


@dataclass(eq=False, slots=True)
class _Topic:
    """What this process knows about one session that has readers here."""

    session_id: str
    # Produced in this process: its entries come with their appends (`Hub.entry`), so no notice is
    # subscribed; what another process writes (a terminal event, when the lease lapsed) the sweep reads.
    local: bool = False
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    cursor: str | None = None
    ended: bool = False
    last_change: float = field(default_factory=time.monotonic)
    foreign: bool = False  # a message on its channel was not a notice (logged once)


class Hub:
    """Owns the pub/sub connection, the fetch loop, the producer-liveness sweep and the streams' heartbeats."""

    FETCH_COUNT = 512
    QUEUE_LIMIT = 4096
    RECONNECT_DELAY_MAX = 0.5  # a refused connect is cheap; a reader waits on this after Redis is back
    LISTEN_POLL_SECONDS = 1.0
    LISTEN_SLICE = 256  # messages handled before the listener lets other tasks run
    CLOSE_WAIT_SECONDS = 5.0

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        lease_ttl: float,
        on_cancel: Callable[[str], None],
        queued_bound: float = 900.0,
        on_fatal: Callable[[str], None] = lambda name: None,
        heartbeat_seconds: float = 15.0,
    ) -> None:
        self._store = store
        self.heartbeats = Heartbeats(heartbeat_seconds)  # every open stream's, in one task
        self._queued_bound = queued_bound
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._lease_ttl = lease_ttl
        self._on_cancel = on_cancel
        self._topics: dict[str, _Topic] = {}
        self._dirty: set[str] = set()
        self._fetch_wake = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._pubsub: Any = None
        self._pubsub_ready = asyncio.Event()
        self._pubsub_lock = asyncio.Lock()
        self._subscribed: set[str] = set()  # SUBSCRIBE sent on the current connection
        self._acked: set[str] = set()  # SUBSCRIBE acknowledged on the current connection
        # Cluster mode: sessions this process generates, whose own cancel channel it listens to.
        self._cancel_wanted: set[str] = set()
        self._cancel_subscribed: set[str] = set()
        self._cancel_changed: set[str] = set()
        self._cancel_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="hub-listen"),
            asyncio.create_task(self._fetch_loop(), name="hub-fetch"),
            asyncio.create_task(self._sweep(), name="hub-sweep"),
        ]
        if self._store.cluster:
            self._tasks.append(asyncio.create_task(self._sync_cancels(), name="hub-cancels"))
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        self.heartbeats.start(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        shared_task_ended(task, closing=self._closing, on_fatal=self._on_fatal)

    def end_streams(self) -> None:
        """Ask every open stream to end now (shutdown): clients reconnect to another instance."""
        self._closing = True
        for topic in self._topics.values():
            for sub in topic.subscribers:
                sub.closed = True
                sub.wake()

    async def close(self) -> None:
        self.end_streams()
        await self.heartbeats.close()
        for task in self._tasks:
            task.cancel()
        # Bounded, and without swallowing a cancel aimed at close() itself.
        _, stuck = await asyncio.wait(self._tasks, timeout=self.CLOSE_WAIT_SECONDS)
        for task in stuck:
            log.error("hub task %s did not stop within %.0fs", task.get_name(), self.CLOSE_WAIT_SECONDS)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()

    @property
    def open_streams(self) -> int:
        return sum(len(t.subscribers) for t in self._topics.values())

    # -- readers -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, session_id: str, after: tuple[int, int]) -> AsyncIterator[Subscriber]:
        """`join`, then `leave` when the block ends."""
        sub = await self.join(session_id, after)
        try:
            yield sub
        finally:
            await self.leave(sub)

    async def join(self, session_id: str, after: tuple[int, int]) -> Subscriber:
        """Register a reader before it reads its backlog, so nothing lands between the two; `leave` it after.

        StreamClosed while shutting down; TimeoutError if the notice subscription is not acknowledged within
        two lease periods (it has left again by then).
        """
        if self._closing:
            raise StreamClosed
        topic = self._topics.get(session_id)
        if topic is None:
            topic = self._topics[session_id] = _Topic(session_id, local=self._store.producing(session_id))
            if topic.local or session_id in self._acked:
                topic.ready.set()
        sub = Subscriber(session_id, after)
        topic.subscribers.add(sub)
        try:
            await self._sync_subscription(session_id)
            if not topic.ready.is_set():
                await asyncio.wait_for(topic.ready.wait(), timeout=self._lease_ttl * 2)
        except BaseException:
            await self.leave(sub)
            raise
        return sub

    async def leave(self, sub: Subscriber) -> None:
        session_id = sub.session_id
        topic = self._topics.get(session_id)
        if topic is None:
            return
        topic.subscribers.discard(sub)
        if not topic.subscribers:
            del self._topics[session_id]
            self._dirty.discard(session_id)
            await self._sync_subscription(session_id)

    def caught_up(self, sub: Subscriber, cursor: str) -> None:
        """A reader has read the stream up to `cursor`; live events after it come from the hub."""
        topic = self._topics.get(sub.session_id)
        if topic is not None and topic.cursor is None:
            topic.cursor = cursor
            self._mark_dirty(topic.session_id)

    async def next_batch(self, sub: Subscriber) -> Frames:
        """This reader's next events, in order and none it has seen; [] means: re-read from the stream.

        `take`, waiting while it has nothing. StreamClosed when the stream must end.
        """
        while (batch := self.take(sub)) is None:
            sub.waiter = asyncio.get_running_loop().create_future()
            try:
                await sub.waiter
            finally:
                sub.waiter = None
        return batch

    @staticmethod
    def take(sub: Subscriber) -> Frames | None:
        """What `next_batch` returns, without waiting: None while nothing is queued for this reader.

        A batch read after an id beyond the reader's last one may follow a gap (the hub's
        cursor began at another reader's position), so the reader re-reads instead.
        """
        if sub.closed:
            raise StreamClosed
        if sub.behind:
            sub.behind = False
            return []
        out: Frames = []
        while sub.pending:
            read_after, frames = sub.pending.popleft()
            sub.queued -= len(frames)
            if read_after > sub.last_id:
                sub.pending = None
                sub.queued = 0
                sub.behind = bool(out)  # deliver what is in order now, re-read on the next call
                return out
            fresh = [item for item in frames if events.entry_key(item[0].id) > sub.last_id]
            if fresh:
                out.extend(fresh)
                sub.last_id = events.entry_key(fresh[-1][0].id)
        sub.pending = None  # empty: drop it, most streams are idle most of the time
        return out or None

    # -- pub/sub -------------------------------------------------------------------------------

    async def _sync_subscription(self, session_id: str) -> None:
        """Make the pub/sub subscription match whether the session has readers here.

        Deciding under the lock from current state means a quick close-and-reopen
        can never leave a topic with readers unsubscribed.
        """
        async with self._pubsub_lock:
            if not self._pubsub_ready.is_set():
                return  # the listener subscribes every topic when it (re)connects
            wanted = (topic := self._topics.get(session_id)) is not None and not topic.local
            channel = keys.notify_channel(session_id)
            try:
                if wanted and session_id not in self._subscribed:
                    await self._pubsub.subscribe(channel)
                    self._subscribed.add(session_id)
                elif not wanted and session_id in self._subscribed:
                    await self._pubsub.unsubscribe(channel)
                    self._subscribed.discard(session_id)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub change for %s failed (%s); the listener will resubscribe", session_id, exc)

    async def _listen(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                await self._connect_pubsub()
                delay = 0.05
                handled = 0
                while not self._closing:
                    # A bounded wait, not timeout=None: redis-py can swallow a cancel that lands while it
                    # reads (seen with the embedded store), so shutdown also relies on this flag check.
                    message = await self._pubsub.get_message(timeout=self.LISTEN_POLL_SECONDS)
                    if message is not None:
                        await self._handle(message)
                        handled += 1
                        if handled % self.LISTEN_SLICE == 0:
                            await asyncio.sleep(0)  # a DirectPubSub's full inbox is taken without a wait
                return
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                self._metrics.redis_errors.labels("pubsub").inc()
                log.warning("pub/sub connection lost (%s); reconnecting in %.2fs", exc, delay)
            except Exception:
                if self._closing:
                    return
                log.exception("pub/sub listener failed; reconnecting in %.2fs", delay)
            self._pubsub_ready.clear()
            self._subscribed.clear()
            self._acked.clear()
            for topic in self._topics.values():
                if not topic.local:
                    topic.ready.clear()
            if self._pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.aclose()
                self._pubsub = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RECONNECT_DELAY_MAX)

    async def _connect_pubsub(self) -> None:
        async with self._pubsub_lock:
            self._pubsub = self._store.notices()
            if self._store.control_channels:
                await self._pubsub.subscribe(*self._store.control_channels)
            sids = [sid for sid, topic in self._topics.items() if not topic.local]
            if sids:
                await self._pubsub.subscribe(*(keys.notify_channel(sid) for sid in sids))
            self._subscribed = set(sids)
            generating = list(self._cancel_wanted)
            if generating:
                await self._pubsub.subscribe(*(keys.cancel_channel(sid) for sid in generating))
            self._cancel_subscribed = set(generating)
            self._pubsub_ready.set()
        if self._topics:
            self._sweep_now.set()  # the store may have restarted: check every producer at once

    async def _handle(self, message: dict[str, Any]) -> None:
        try:
            self._on_message(message)
        except Exception:
            log.exception("pub/sub message %r could not be handled", message)
            channel = message.get("channel")
            if isinstance(channel, str) and channel != keys.CANCEL_CHANNEL:
                with contextlib.suppress(Exception):
                    await self._fail_session(keys.session_id_from_channel(channel))

    def _on_message(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if channel == keys.CANCEL_CHANNEL:
            if kind == "message":
                self._on_cancel(message["data"])
            return
        session_id = keys.session_id_from_channel(channel)
        if channel == keys.cancel_channel(session_id):
            if kind == "message":
                self._on_cancel(session_id)
            return
        if kind == "unsubscribe":
            self._acked.discard(session_id)
        elif kind == "subscribe":
            self._acked.add(session_id)
        topic = self._topics.get(session_id)
        if topic is None:
            return
        if kind == "subscribe":
            topic.ready.set()
            if topic.cursor is not None:
                self._mark_dirty(topic.session_id)  # notices may have been lost while unsubscribed
        elif kind == "message":
            try:
                notice = _notice(message["data"])
            except ValueError:  # not one of ours (undecodable, or not a notice): the stream says what is new
                if not topic.foreign:  # once a session: whoever publishes there could flood the log
                    log.warning("session %s: a message on its channel is not a notice; reading it", session_id)
                topic.foreign = True
                if topic.cursor is not None:
                    self._mark_dirty(session_id)
                return
            if notice.previous is not None and notice.event is not None:
                self.entry(session_id, notice.previous, notice.event)
            elif topic.cursor is not None and events.entry_key(notice.id) > events.entry_key(topic.cursor):
                self._mark_dirty(session_id)

    # -- cancel notices on a cluster ------------------------------------------------------------

    def follow_cancel(self, session_id: str, generating: bool) -> None:
        """Cluster mode: listen to a session's own cancel channel while this process generates it.

        On a single Redis every hub hears the one global cancel channel, so this does nothing there.
        """
        if not self._store.cluster:
            return
        if generating:
            self._cancel_wanted.add(session_id)
        else:
            self._cancel_wanted.discard(session_id)
        self._cancel_changed.add(session_id)
        self._cancel_wake.set()

    async def _sync_cancels(self) -> None:
        """Make the cancel subscriptions match the sessions this process generates (missed ones: the flag)."""
        while True:
            await self._cancel_wake.wait()
            self._cancel_wake.clear()
            changed, self._cancel_changed = self._cancel_changed, set()
            async with self._pubsub_lock:
                if not self._pubsub_ready.is_set():
                    continue  # the listener subscribes every wanted channel when it (re)connects
                try:
                    join = [sid for sid in changed if sid in self._cancel_wanted and sid not in self._cancel_subscribed]
                    leave = [
                        sid for sid in changed if sid not in self._cancel_wanted and sid in self._cancel_subscribed
                    ]
                    if join:
                        await self._pubsub.subscribe(*(keys.cancel_channel(sid) for sid in join))
                        self._cancel_subscribed.update(join)
                    if leave:
                        await self._pubsub.unsubscribe(*(keys.cancel_channel(sid) for sid in leave))
                        self._cancel_subscribed.difference_update(leave)
                except (RedisError, OSError) as exc:
                    log.warning("cancel subscriptions failed (%s); the listener will resubscribe", exc)

    # -- entries that need no read ------------------------------------------------------------------

    def entry(self, session_id: str, previous: str, event: Event | None) -> None:
        """An entry with the id before it: appended by a producer here (`Store.on_entry`) or carried by its notice.

        When this process's readers of the session have everything up to `previous`, it goes to them as it
        is, with no read; an entry after a gap is read from the stream instead; one already held is dropped.
        An entry may come both ways (the append's reply and the notice): only the first is delivered.
        No event (None): the stream changed in a way the caller cannot describe; it is read.
        """
        topic = self._topics.get(session_id)
        if topic is None or topic.cursor is None or topic.ended:
            return  # a reader not yet caught up reads the stream itself
        if event is None:
            self._mark_dirty(session_id)
        elif topic.cursor == previous:
            try:
                self._deliver(session_id, previous, [event])
            except Exception:  # never into the append's caller (the batcher): the read path fails the session
                log.exception("session %s: entry %s could not be delivered; reading it instead", session_id, event.id)
                self._mark_dirty(session_id)
        elif events.entry_key(event.id) > events.entry_key(topic.cursor):
            self._mark_dirty(session_id)

    # -- fetching --------------------------------------------------------------------------------

    def _mark_dirty(self, session_id: str) -> None:
        self._dirty.add(session_id)
        self._fetch_wake.set()

    async def _fetch_loop(self) -> None:
        while True:
            await self._fetch_wake.wait()
            self._fetch_wake.clear()
            try:
                await self._fetch_dirty()
            except Exception:
                log.exception("fetching %d sessions failed", len(self._dirty))
                await asyncio.sleep(0.2)

    async def _fetch_dirty(self) -> None:
        cursors = {
            sid: topic.cursor
            for sid in self._dirty
            if (topic := self._topics.get(sid)) is not None and topic.cursor is not None and not topic.ended
        }
        self._dirty.clear()
        if not cursors:
            return
        try:
            fetched = await self._store.read_after_many(cursors, count=self.FETCH_COUNT)
        except (RedisError, OSError) as exc:
            self._metrics.redis_errors.labels("reader").inc()
            log.warning("stream read failed (%s); retrying", exc)
            for sid in cursors:
                self._dirty.add(sid)
            await asyncio.sleep(0.2)
            self._fetch_wake.set()
            return
        except Exception:
            # One session's entries broke the batched read: read each apart so the others go on.
            fetched = await self._read_apart(cursors)
        for sid, batch in fetched.items():
            try:
                self._deliver(sid, cursors[sid], batch)
            except Exception:
                log.exception("session %s: its events could not be delivered", sid)
                await self._fail_session(sid)
        missed = {sid for sid in cursors.keys() - fetched.keys() if (t := self._topics.get(sid)) and not t.ended}
        if missed:  # on a cluster: their master is failing over
            self._metrics.redis_errors.labels("reader").inc()
            self._dirty.update(missed)
            await asyncio.sleep(0.2)
            self._fetch_wake.set()

    async def _read_apart(self, cursors: dict[str, str]) -> dict[str, list[Event]]:
        fetched: dict[str, list[Event]] = {}
        for sid, cursor in cursors.items():
            try:
                fetched.update(await self._store.read_after_many({sid: cursor}, count=self.FETCH_COUNT))
            except (RedisError, OSError):
                self._mark_dirty(sid)
            except Exception:
                log.exception("session %s: its stream cannot be read", sid)
                await self._fail_session(sid)
        return fetched

    async def _fail_session(self, session_id: str) -> None:
        """One session's data broke a shared task: end it with `internal_error` and close its streams here."""
        data = events.error_data("internal_error", "The answer failed on the server.", retryable=True)
        with contextlib.suppress(RedisError, OSError):
            await self._store.append(session_id, events.ERROR, data, terminal_status="failed", by_producer=False)
        self._end_topic(session_id, "failed on a shared task")

    def _deliver(self, session_id: str, read_from: str, batch: list[Event]) -> None:
        topic = self._topics.get(session_id)
        if topic is None or topic.cursor != read_from or not batch:
            return
        frames: Frames = []
        for event in batch:
            frames.append((event, events.frame(event)))
            if event.terminal:
                topic.ended = True
                break
        topic.cursor = frames[-1][0].id
        topic.last_change = time.monotonic()
        read_after = events.entry_key(read_from)
        for sub in topic.subscribers:
            sub.offer(read_after, frames, self.QUEUE_LIMIT)
        if len(batch) == self.FETCH_COUNT and not topic.ended:
            self._mark_dirty(session_id)

    # -- producer liveness -------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """End streams whose producer's lease lapsed, or whose answer never left `queued`."""
        interval = max(0.1, self._lease_ttl / 2)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), interval)
            threshold = 0.0 if self._sweep_now.is_set() else interval
            self._sweep_now.clear()
            try:
                await self._sweep_once(threshold)
            except (RedisError, OSError) as exc:
                self._metrics.redis_errors.labels("sweep").inc()
                log.warning("lease sweep failed: %s", exc)
            except Exception:
                log.exception("lease sweep failed")

    async def _sweep_once(self, threshold: float) -> None:
        now = time.monotonic()
        quiet = [
            sid
            for sid, topic in self._topics.items()
            if not topic.ended and topic.cursor is not None and now - topic.last_change >= threshold
        ]
        if not quiet:
            return
        # A producer that holds its lease but never writes (a wedged task) would leave readers waiting for ever.
        stuck = [sid for sid in quiet if now - self._topics[sid].last_change >= self._queued_bound]
        for sid in await self._store.missing_leases(quiet):
            data = events.error_data("producer_lost", "The server generating this answer stopped.", retryable=True)
            outcome = await self._store.fail_orphan(sid, data)
            if outcome == "gone":
                self._end_topic(sid)
                continue
            if outcome is not None:
                log.warning("session %s: producer lost; ended with a retryable error", sid)
            # Its terminal event (this one, or one another process wrote) may have no notice here: read it.
            self._mark_dirty(sid)
        if stuck:
            data = events.error_data("internal_error", "The answer never started on the server.", retryable=True)
            for sid in await self._store.fail_queued(stuck, data, older_than=self._queued_bound):
                log.error("session %s: still queued after %.0fs; ended with internal_error", sid, self._queued_bound)
                self._mark_dirty(sid)

    def _end_topic(self, session_id: str, why: str = "vanished from the store") -> None:
        """End the session's streams here: it vanished (a reconnect is answered 404, not silence) or failed."""
        log.warning("session %s: %s; ending its streams", session_id, why)
        if (topic := self._topics.get(session_id)) is not None:
            topic.ended = True
            topic.ready.set()  # a reader still waiting for its subscription gets its stream, and its end
            for sub in topic.subscribers:
                sub.closed = True
                sub.wake()


def _notice(data: str | None) -> Notice:
    """A notice whose ids are entry ids; ValueError for anything else on the channel (None: not UTF-8)."""
    if data is None:
        raise ValueError("not UTF-8")
    notice = Notice.parse(data)
    events.entry_key(notice.id)
    if notice.previous is not None:
        events.entry_key(notice.previous)
    return notice
