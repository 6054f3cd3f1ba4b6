"""The service's side of the index: the best passages for a question, within a character budget.

One worker thread owns the SQLite connection, so a search never blocks the event loop. Before each search
it compares the file's inode, size and modification time with those of the open index (one `stat`), and
opens the new file when they differ: `chatbot index` can rebuild the index while the service runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import index
from .passages import Passage

log = logging.getLogger(__name__)

CANDIDATES = 12  # passages read per search before the budget picks
RELATIVE_FLOOR = 0.3  # a passage scoring below this share of the best one is noise, not context
RECENT_TERMS = 12  # words taken from each earlier question of the conversation


@dataclass(frozen=True, slots=True)
class Retrieval:
    """What a question found: passages best first, and their pages (each once, best first)."""

    passages: tuple[Passage, ...]

    @property
    def sources(self) -> list[dict[str, str]]:
        seen: dict[str, str] = {}
        for passage in self.passages:
            if passage.url.startswith(("https://", "http://")):  # a link a browser may follow, whoever built the index
                seen.setdefault(passage.url, passage.title)
        return [{"title": title, "url": url} for url, title in seen.items()]


def query_terms(message: str, recent: Sequence[str] = ()) -> list[str]:
    """The question's words first, then a few from each earlier question, latest first (a follow-up's
    "how do I install it?" keeps the project named one turn before)."""
    words = index.terms(message)
    for earlier in reversed(recent):
        words += [w for w in index.terms(earlier)[:RECENT_TERMS] if w not in words]
    return words[: index.MAX_TERMS]


def pick(hits: Sequence[index.Hit], max_chars: int) -> tuple[Passage, ...]:
    """Hits above the relative floor, best first, while their text fits in max_chars (the first always does,
    cut if it must be)."""
    if not hits:
        return ()
    floor = hits[0].score * RELATIVE_FLOOR
    chosen: list[Passage] = []
    used = 0
    for hit in hits:
        if hit.score < floor:
            break
        size = len(hit.passage.text)
        if not chosen and size > max_chars:
            p = hit.passage
            return (Passage(p.title, p.url, p.heading, p.text[:max_chars]),)
        if used + size > max_chars:
            continue
        chosen.append(hit.passage)
        used += size
    return tuple(chosen)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Knowledge:
    """An open index file and its worker thread; `retrieve` finds passages, `close` stops the thread."""

    def __init__(self, path: str | Path, *, max_chars: int) -> None:
        """Open the index now; raises index.BadIndex (missing, unreadable, not an index)."""
        self.path = Path(path)
        self.max_chars = max_chars
        self._seen = self._stat_or_raise()
        self._connection = index.open_index(self.path)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge")
        log.info("knowledge: %s, %d passages", self.path, index.count(self._connection))

    def _stat_or_raise(self) -> tuple[int, int, int, int]:
        try:
            return _identity(self.path)
        except OSError as exc:
            raise index.BadIndex(exc.strerror or type(exc).__name__) from None

    async def retrieve(self, message: str, recent: Sequence[str] = ()) -> Retrieval:
        """The passages for a message and the conversation's earlier questions; empty when nothing matched."""
        words = query_terms(message, recent)
        if not words:
            return Retrieval(())
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._worker, self.search, words)
        except sqlite3.Error as exc:  # a damaged file: this answer goes without, the next search retries
            log.warning("knowledge: search in %s failed: %s", self.path, exc)
            return Retrieval(())

    def search(self, words: Sequence[str]) -> Retrieval:
        """Synchronous: runs in the worker thread (and in the benchmark)."""
        self._reload_if_changed()
        hits = index.search(self._connection, words, limit=CANDIDATES)
        return Retrieval(pick(hits, self.max_chars))

    def _reload_if_changed(self) -> None:
        try:
            seen = _identity(self.path)
        except OSError as exc:
            seen = (-1, -1, -1, -1)
            if seen != self._seen:
                log.warning("knowledge: %s unreadable (%s); keeping the index already open", self.path, exc)
        else:
            if seen != self._seen:
                self._reopen()
        self._seen = seen

    def _reopen(self) -> None:
        try:
            fresh = index.open_index(self.path)
        except index.BadIndex as exc:
            log.warning("knowledge: %s changed but cannot be opened (%s); keeping the old index", self.path, exc)
            return
        old, self._connection = self._connection, fresh
        old.close()
        log.info("knowledge: reloaded %s, %d passages", self.path, index.count(fresh))

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._connection.close()
