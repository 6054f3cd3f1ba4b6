"""`chatbot index SOURCE…`: read every source, split its documents into passages, replace the index file.

A SOURCE is a folder or an http(s) URL of a sitemap or a feed. Whatever a source holds, the run reports
it and goes on; the index is replaced only when at least one document was read, so a site that is down
during a scheduled rebuild does not empty the assistant's knowledge.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from . import crawl, folder, index
from .passages import Passage, split
from .sources import Found, Outcome, Skipped


@dataclass
class Report:
    """What a run read and skipped, for the summary it prints."""

    documents: list[Found] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    passages: int = 0


@dataclass(frozen=True, kw_only=True)
class Options:
    out: Path
    base_url: str | None = None
    concurrency: int = 4
    timeout: float = 10.0
    max_pages: int = 10_000


class _Progress:
    """One self-overwriting status line on a terminal; nothing otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._on = stream.isatty()
        self._last = 0.0

    def pages(self, source: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._on and (done == total or now - self._last > 0.1):
            self._last = now
            self._stream.write(f"\r\x1b[K{source}: {done}/{total} pages")
            self._stream.flush()

    def clear(self) -> None:
        if self._on:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


async def run(sources: Sequence[str], options: Options, *, progress: TextIO = sys.stderr) -> Report:
    """Read every source and, if any document was read, write the index to options.out."""
    report = Report()
    seen: set[str] = set()
    status = _Progress(progress)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        fetcher = crawl.Fetcher(session, concurrency=options.concurrency, timeout=options.timeout)
        for source in sources:
            async for outcome in _outcomes(source, options, fetcher, status):
                if isinstance(outcome, Found) and outcome.document.url in seen:
                    report.skipped.append(Skipped(outcome.source, f"{outcome.document.url} was read already"))
                elif isinstance(outcome, Found):
                    seen.add(outcome.document.url)
                    report.documents.append(outcome)
                else:
                    report.skipped.append(outcome)
            status.clear()
    if report.documents:
        report.passages = index.write(options.out, _passages(report.documents), documents=len(report.documents))
    return report


async def _outcomes(source: str, options: Options, fetcher: crawl.Fetcher, status: _Progress) -> AsyncIterator[Outcome]:
    if source.startswith(("http://", "https://")):
        pages = crawl.read(
            source, fetcher, max_pages=options.max_pages, progress=lambda d, t: status.pages(source, d, t)
        )
        async for outcome in pages:
            yield outcome
    elif "://" in source:
        yield Skipped(source, "only http and https URLs can be fetched")
    else:
        for outcome in folder.read(source, base_url=options.base_url):
            yield outcome


def _passages(found: Sequence[Found]) -> Iterator[Passage]:
    for item in found:
        yield from split(item.document)


def summary(report: Report, out: Path) -> str:
    """The report as the lines `chatbot index` prints."""
    lines = [f"indexed {len(report.documents)} documents: {report.passages} passages"]
    lines += [f"  {found.document.url}  ({found.source})" if found.source != found.document.url
              else f"  {found.document.url}" for found in sorted(report.documents, key=_url)]  # fmt: skip
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)}:")
        lines += [f"  {item.source}: {item.reason}" for item in report.skipped]
    if report.documents:
        lines.append(f"wrote {out}")
    else:
        lines.append(f"nothing to index: {out} left as it was")
    return "\n".join(lines)


def _url(found: Found) -> str:
    return found.document.url
