"""Documents and their passages: a document's Markdown text split along its headings. Pure, no I/O."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# A passage longer than this is cut at paragraph boundaries, so that one long section cannot fill the budget.
MAX_PASSAGE_CHARS = 1200

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Document:
    """One page of the site: its title, its public URL, its text as Markdown (headings as `#` lines)."""

    title: str
    url: str
    text: str


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of a document under one heading: `heading` is the path of headings to it, `" › "`-joined."""

    title: str
    url: str
    heading: str
    text: str


def normalize(text: str) -> str:
    """NFKC, so that composed and decomposed characters index and match alike."""
    return unicodedata.normalize("NFKC", text)


def first_heading(text: str) -> str:
    """The text of the first Markdown heading outside code fences, or ""."""
    for level, heading, _ in _sections(text):
        if level:
            return heading
    return ""


def split(document: Document, *, max_chars: int = MAX_PASSAGE_CHARS) -> list[Passage]:
    """The document's passages in order: one per heading's section (longer ones cut), empty sections dropped."""
    passages: list[Passage] = []
    path: list[tuple[int, str]] = []
    for level, heading, body in _sections(normalize(document.text)):
        if level:
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, heading))
        names = [name for _, name in path if name and name != document.title]
        for piece in _pieces(body.strip(), max_chars):
            passages.append(Passage(document.title, document.url, " › ".join(names), piece))
    return passages


def _sections(text: str) -> list[tuple[int, str, str]]:
    """(heading level or 0 before the first heading, heading text, the body under it)."""
    sections: list[tuple[int, str, str]] = []
    level, heading, body = 0, "", list[str]()
    fence = ""
    for line in _LINES.split(text):  # not str.splitlines: U+2028 and friends are text here
        if fence:
            if line.strip().startswith(fence):
                fence = ""
        elif match := _FENCE.match(line):
            fence = match[1][:3]
        elif match := _ATX.match(line):
            sections.append((level, heading, "\n".join(body)))
            level, heading, body = len(match[1]), match[2].strip(), []
            continue
        body.append(line)
    sections.append((level, heading, "\n".join(body)))
    return sections


def _pieces(body: str, max_chars: int) -> list[str]:
    """The body whole if short enough, else paragraphs packed greedily into pieces of at most max_chars."""
    if not body:
        return []
    if len(body) <= max_chars:
        return [body]
    pieces: list[str] = []
    current = ""
    for paragraph in re.split(r"\n[ \t]*\n", body):
        for part in _cut(paragraph.strip(), max_chars):
            if current and len(current) + 2 + len(part) > max_chars:
                pieces.append(current)
                current = ""
            current = f"{current}\n\n{part}" if current else part
    if current:
        pieces.append(current)
    return pieces


def _cut(paragraph: str, max_chars: int) -> list[str]:
    """A paragraph longer than max_chars cut at the last space before the limit (or at the limit)."""
    parts = []
    while len(paragraph) > max_chars:
        at = paragraph.rfind(" ", 0, max_chars)
        at = at if at > max_chars // 2 else max_chars
        parts.append(paragraph[:at].rstrip())
        paragraph = paragraph[at:].lstrip()
    if paragraph:
        parts.append(paragraph)
    return parts
