"""Documents from the web: the pages a sitemap or an RSS/Atom feed lists, fetched politely, reduced to main text.

Politely: a few requests at a time, each within a timeout, with our User-Agent, robots.txt honoured
(RFC 9309: a 4xx robots.txt allows everything, an unreachable one nothing) and its Crawl-delay kept.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin

import aiohttp
import feedparser
from protego import Protego
from usp.objects.sitemap import AbstractIndexSitemap, InvalidSitemap
from usp.tree import sitemap_from_str

from . import sources
from .passages import Document, first_heading
from .sources import Found, Outcome, Skipped, main_text, string, web_url

# A robots.txt Crawl-delay is honoured up to this many seconds between requests to one origin.
MAX_CRAWL_DELAY = 10.0
MAX_SITEMAPS = 1000  # sitemaps read for one source, sitemap indexes included

USER_AGENT = "chatbot-indexer/0.1 (indexes a site's own pages for its chat assistant)"


class FetchError(Exception):
    """A URL could not be fetched; the message says why, for the report."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response's media type, its declared charset (if any) and its body."""

    kind: str
    charset: str | None
    body: bytes

    def text(self) -> str:
        """The body decoded by its declared charset, else UTF-8; undecodable bytes become U+FFFD."""
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return self.body.decode("utf-8", errors="replace")


@dataclass
class Fetcher:
    """Polite HTTP GETs: at most `concurrency` at once, each within `timeout` seconds and `max_bytes`."""

    session: aiohttp.ClientSession
    concurrency: int = 4
    timeout: float = 10.0
    max_bytes: int = 10 * 1024 * 1024
    _slots: asyncio.Semaphore = field(init=False)
    _robots: dict[str, asyncio.Future[Protego | FetchError]] = field(init=False, default_factory=dict)
    _pacing: dict[str, asyncio.Lock] = field(init=False, default_factory=dict)
    _next: dict[str, float] = field(init=False, default_factory=dict)  # loop time of an origin's next request

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)

    async def get(self, url: str) -> Fetched:
        """The response to a GET of `url`; raises FetchError. Waits out the origin's Crawl-delay, if it sets one."""
        origin = sources.origin(url)
        rules = await self._rules(origin)
        if isinstance(rules, FetchError):
            raise FetchError(f"robots.txt unreadable ({rules}), so nothing is fetched from {origin}")
        if not rules.can_fetch(url, USER_AGENT):
            raise FetchError("disallowed by robots.txt")
        delay = min(float(rules.crawl_delay(USER_AGENT) or 0.0), MAX_CRAWL_DELAY)
        if not delay:
            return await self._get(url)
        loop = asyncio.get_running_loop()
        async with self._pacing.setdefault(origin, asyncio.Lock()):  # one at a time, `delay` apart
            if (wait := self._next.get(origin, 0.0) - loop.time()) > 0:
                await asyncio.sleep(wait)
            try:
                return await self._get(url)
            finally:
                self._next[origin] = loop.time() + delay

    async def _get(self, url: str) -> Fetched:
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.session.get(url, headers={"User-Agent": USER_AGENT}) as response:
                        if response.status != 200:
                            raise FetchError(f"HTTP {response.status}")
                        body = await response.content.read(self.max_bytes + 1)
                        if len(body) > self.max_bytes:
                            raise FetchError(f"larger than {self.max_bytes} bytes")
                        kind, charset = response.content_type, response.charset
            except TimeoutError:
                raise FetchError(f"no complete answer within {self.timeout:g} s") from None
            except aiohttp.ClientError as exc:
                raise FetchError(f"{type(exc).__name__}: {exc}") from None
        if body[:2] == b"\x1f\x8b":  # a .xml.gz sitemap
            try:
                body = gzip.decompress(body)[: self.max_bytes]
            except (OSError, EOFError):
                raise FetchError("not valid gzip") from None
        return Fetched(kind, charset, body)

    async def _rules(self, origin: str) -> Protego | FetchError:
        """The origin's robots.txt rules, read once per origin, or why they could not be read."""
        if origin not in self._robots:
            self._robots[origin] = asyncio.ensure_future(self._read_robots(origin))
        return await self._robots[origin]

    async def _read_robots(self, origin: str) -> Protego | FetchError:
        """The origin's rules; an allow-all for a 4xx; why not, when it cannot be read (then fetch nothing)."""
        try:
            robots = await self._get(origin + "/robots.txt")
        except FetchError as exc:
            return Protego.parse("") if str(exc).startswith("HTTP 4") else exc
        return Protego.parse(robots.text())


@dataclass(frozen=True, slots=True)
class _Link:
    url: str
    title: str = ""  # the feed's title for it, used when the page has none


async def read(
    url: str, fetcher: Fetcher, *, max_pages: int, progress: Callable[[int, int], None]
) -> AsyncIterator[Outcome]:
    """The pages a sitemap (or sitemap index) or an RSS/Atom feed lists, fetched and reduced to main text."""
    links: list[_Link] = []
    skipped: list[Skipped] = []
    await _listing(url, fetcher, links, skipped, seen=set())
    if not links and not skipped:
        skipped.append(Skipped(url, "lists no pages"))  # e.g. a sitemap index listing only itself
    for item in skipped:
        yield item
    unique = list({link.url: link for link in links}.values())
    if len(unique) > max_pages:
        yield Skipped(url, f"{len(unique) - max_pages} pages beyond --max-pages {max_pages}")
        unique = unique[:max_pages]
    tasks = [asyncio.ensure_future(_page(link, fetcher)) for link in unique]
    try:
        for done, task in enumerate(asyncio.as_completed(tasks), 1):
            progress(done, len(tasks))
            yield await task
    finally:
        for task in tasks:
            task.cancel()


async def _listing(url: str, fetcher: Fetcher, links: list[_Link], skipped: list[Skipped], *, seen: set[str]) -> None:
    """Add the pages `url` lists to links: a feed's entries, a sitemap's pages, an index's sitemaps' pages."""
    seen.add(url)
    try:
        listing = await fetcher.get(url)
    except FetchError as exc:
        skipped.append(Skipped(url, str(exc)))
        return
    try:
        subs = _read_listing(url, listing, links, skipped)
    except Exception as exc:  # a parser's failure on one document skips that document, never the run
        skipped.append(Skipped(url, f"cannot be read as a sitemap or a feed ({type(exc).__name__}: {exc})"))
        return
    for sub in subs:
        if sub in seen:
            continue
        if len(seen) >= MAX_SITEMAPS:
            skipped.append(Skipped(sub, f"more than {MAX_SITEMAPS} sitemaps under {url}"))
            continue
        await _listing(sub, fetcher, links, skipped, seen=seen)


def _read_listing(url: str, listing: Fetched, links: list[_Link], skipped: list[Skipped]) -> list[str]:
    """Add a feed's or a sitemap's pages to links; a sitemap index's sitemaps are returned instead."""
    feed = feedparser.parse(listing.body)  # bytes: feedparser finds the encoding in the XML declaration
    if feed.version:
        found = [_Link(urljoin(url, e.link), e.get("title", "")) for e in feed.entries if e.get("link")]
        found = [link for link in found if web_url(link.url)]
        if not found:
            skipped.append(Skipped(url, f"a feed ({feed.version}) with no entries linking to http(s) pages"))
        links += found
        return []
    sitemap = sitemap_from_str(listing.text())
    if isinstance(sitemap, AbstractIndexSitemap):
        return [sub.url for sub in sitemap.sub_sitemaps if web_url(sub.url)]
    pages = [_Link(page.url) for page in sitemap.all_pages() if web_url(page.url)]
    if isinstance(sitemap, InvalidSitemap) or not pages:
        skipped.append(Skipped(url, "not a sitemap or an RSS/Atom feed (or one listing no http(s) pages)"))
    links += pages
    return []


async def _page(link: _Link, fetcher: Fetcher) -> Outcome:
    try:
        page = await fetcher.get(link.url)
    except FetchError as exc:
        return Skipped(link.url, str(exc))
    try:
        return await _read_page(link, page)
    except Exception as exc:  # the extractor's failure on one page skips that page, never the run
        return Skipped(link.url, f"cannot be read ({type(exc).__name__}: {exc})")


async def _read_page(link: _Link, page: Fetched) -> Outcome:
    if page.kind == "text/plain":
        meta: dict[str, object] = {}
        text = page.text()
    elif page.kind in ("text/html", "application/xhtml+xml", ""):
        # Bytes unless the server named a charset: trafilatura then reads the page's own <meta charset>.
        raw: str | bytes = page.text() if page.charset else page.body
        extracted = await asyncio.to_thread(main_text, raw)
        if extracted is None:
            return Skipped(link.url, "no main text found in the HTML")
        meta, text = extracted
    else:
        return Skipped(link.url, f"not a page ({page.kind})")
    title = string(meta.get("title")) or link.title or first_heading(text) or link.url
    return Found(link.url, Document(title, link.url, text))
