"""The index file: one SQLite database with an FTS5 table of passages, ranked by BM25.

Written to a temporary file beside the target and renamed over it, so that a reader sees the old index
or the new one, never half of one. Queries are built from words only, each quoted, so no user text can
be read as FTS5 syntax.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .passages import Passage, normalize

FORMAT = "chatbot-knowledge/1"

# porter: "installing" finds "install"; remove_diacritics 2: "cafe" finds "café".
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE VIRTUAL TABLE passages USING fts5(
  title, heading, body, url UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2'
);
"""

# BM25 weights of the columns title, heading, body: a word in a page's title or a section's heading says
# more about what the passage is for than the same word in its text.
_WEIGHTS = (4.0, 2.0, 1.0)

_SEARCH = f"""
SELECT title, url, heading, body, bm25(passages, {", ".join(map(str, _WEIGHTS))}) AS score
FROM passages WHERE passages MATCH ? ORDER BY score LIMIT ?
"""

MAX_TERMS = 40

# Words that say nothing about which page answers: English function words and the words of a question.
_STOP_WORDS = """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing done down during each else ever few for from further get
    gets got had has have having he her here hers herself him himself his how i if in into is it its itself
    just let like me more most much my myself no nor not now of off on once only or other our ours ourselves
    out over own please same say she should so some such tell than thank thanks that the their theirs them
    themselves then there these they this those through to too under until up us use used using very want
    was we were what when where which while who whom whose why will with would yes you your yours yourself
    yourselves know explain anything something thing things way ways one really may might must shall
"""
STOP_WORDS = frozenset(_STOP_WORDS.split())

_WORD = re.compile(r"[^\W_]+")


class BadIndex(Exception):
    """The file is not a readable index."""


@dataclass(frozen=True, slots=True)
class Hit:
    """A passage found for a query; a higher `score` is a better match (BM25, sign flipped)."""

    passage: Passage
    score: float


def terms(text: str) -> list[str]:
    """The searchable words of any text, lower-cased, without stop words or repeats, in order."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(normalize(text).lower()):
        if word not in STOP_WORDS and (len(word) > 1 or word.isdigit()) and word not in seen:
            seen[word] = None
    return list(seen)


def match_expression(words: Sequence[str]) -> str:
    """An FTS5 query matching any of the words; each is a quoted string, so none is an operator."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words[:MAX_TERMS])


def write(path: str | Path, passages: Iterable[Passage], *, documents: int) -> int:
    """Build a new index of the passages and rename it over `path`; the number of passages written."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        connection = sqlite3.connect(temporary)
        try:
            connection.executescript(_SCHEMA)
            with connection:
                count = 0
                for passage in passages:
                    connection.execute(
                        "INSERT INTO passages (title, heading, body, url) VALUES (?, ?, ?, ?)",
                        (passage.title, passage.heading, passage.text, passage.url),
                    )
                    count += 1
                connection.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("built", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                     ("documents", str(documents)), ("passages", str(count))],
                )  # fmt: skip
                connection.execute("INSERT INTO passages (passages) VALUES ('optimize')")
        finally:
            connection.close()
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename itself durable, where the platform allows
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return count


def open_index(path: str | Path) -> sqlite3.Connection:
    """Open an index read-only, for use from one thread at a time; raises BadIndex saying why not."""
    target = Path(path)
    if not target.is_file():
        raise BadIndex("no such file" if not target.exists() else "not a file")
    try:
        connection = sqlite3.connect(target.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise BadIndex(str(exc)) from None
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        connection.execute("SELECT rowid FROM passages LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        connection.close()
        raise BadIndex(f"not an index built by `chatbot index` ({exc})") from None
    if row is None or row[0] != FORMAT:
        connection.close()
        raise BadIndex(f"index format {row[0] if row else None!r}, expected {FORMAT!r}: rebuild it")
    return connection


def count(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT value FROM meta WHERE key = 'passages'").fetchone()
    return int(row[0]) if row else 0


def search(connection: sqlite3.Connection, words: Sequence[str], *, limit: int) -> list[Hit]:
    """The best `limit` passages containing any of the words, best first; [] for no words."""
    if not words:
        return []
    rows = connection.execute(_SEARCH, (match_expression(words), limit)).fetchall()
    return [Hit(Passage(title, url, heading, body), -score) for title, url, heading, body, score in rows]
