"""Documents from the sources `chatbot index` is given: folders of files, and sitemaps and feeds on the web.

Each collector yields `Found` (a document and where it came from) or `Skipped` (what and why); nothing a
source holds makes it raise. Web pages are fetched politely: a few at a time, with a timeout, our
User-Agent, robots.txt honoured (RFC 9309: a 4xx robots.txt allows everything, an unreachable one nothing).
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import feedparser
import frontmatter
import trafilatura
import yaml
from protego import Protego
from usp.objects.sitemap import AbstractIndexSitemap, InvalidSitemap
from usp.tree import sitemap_from_str

from .passages import Document, first_heading

MARKDOWN = frozenset({".md", ".markdown"})
HTML = frozenset({".html", ".htm"})
TEXT = frozenset({".txt"})

# A robots.txt Crawl-delay is honoured up to this many seconds between requests to one origin.
MAX_CRAWL_DELAY = 10.0
MAX_SITEMAPS = 1000  # sitemaps read for one source, sitemap indexes included

USER_AGENT = "chatbot-indexer/0.1 (indexes a site's own pages for its chat assistant)"


@dataclass(frozen=True, slots=True)
class Found:
    source: str  # the file or URL it was read from
    document: Document


@dataclass(frozen=True, slots=True)
class Skipped:
    source: str
    reason: str


Outcome = Found | Skipped


# ---- folders ----


def folder(root: str | Path, *, base_url: str | None) -> Iterator[Outcome]:
    """Every Markdown, HTML and text file under `root` (hidden ones aside), sorted by path."""
    top = Path(root)
    if not top.is_dir():
        yield Skipped(str(root), "no such folder" if not top.exists() else "not a folder")
        return
    other = 0
    for path in sorted(_files(top)):
        suffix = path.suffix.lower()
        if suffix not in MARKDOWN | HTML | TEXT:
            other += 1
            continue
        yield _file(path, path.relative_to(top), base_url)
    if other:
        yield Skipped(str(root), f"{other} files of other types (not .md, .markdown, .html, .htm, .txt)")


def _files(top: Path) -> Iterator[Path]:
    for directory, subdirectories, names in os.walk(top):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        yield from (Path(directory, name) for name in names if not name.startswith("."))


def _file(path: Path, relative: Path, base_url: str | None) -> Outcome:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return Skipped(str(path), "not UTF-8 text")
    except OSError as exc:
        return Skipped(str(path), exc.strerror or type(exc).__name__)
    suffix = path.suffix.lower()
    if suffix in HTML:
        try:
            page = _html(raw)
        except Exception as exc:  # the extractor's failure on one file skips that file, never the run
            return Skipped(str(path), f"cannot be read ({type(exc).__name__}: {exc})")
        if page is None:
            return Skipped(str(path), "no main text found in the HTML")
        meta, text = page
    else:
        try:
            post = frontmatter.loads(raw)
        except yaml.YAMLError as exc:
            return Skipped(str(path), f"front matter is not valid YAML ({type(exc).__name__})")
        meta, text = post.metadata, post.content
    if meta.get("draft") is True:
        return Skipped(str(path), "draft: true")
    title = _string(meta.get("title")) or first_heading(text) or _first_line(text) or path.stem
    url = _file_url(meta, relative, base_url)
    if url is None:
        return Skipped(str(path), "no URL: give --base-url, or `url`/`permalink` in its front matter")
    if not _web_url(url):
        return Skipped(str(path), f"its URL {url!r} is not an http(s) URL")
    if not text.strip():
        return Skipped(str(path), "empty")
    return Found(str(path), Document(title, url, text))


def _string(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")[:200]


def _file_url(meta: dict[str, object], relative: Path, base_url: str | None) -> str | None:
    """Front matter's `url` or `permalink` (absolute, or joined to base_url), else base_url + the file's path:
    `posts/a.md` → `posts/a`, `docs/index.md` → `docs/`, HTML files keep their name."""
    given = _string(meta.get("url")) or _string(meta.get("permalink"))
    if given and urlsplit(given).scheme in ("http", "https"):
        return given
    if base_url is None:
        return None
    base = base_url.rstrip("/") + "/"
    if given:
        return urljoin(base, given.lstrip("/"))
    posix = PurePosixPath(relative.as_posix())
    if posix.suffix.lower() not in HTML:
        posix = posix.with_suffix("")
    path = quote(str(posix))
    if posix.name == "index":
        path = path[: -len("index")]
    return base + path


def _html(raw: str | bytes) -> tuple[dict[str, object], str] | None:
    """The page's main text as Markdown (headings kept) and its metadata, by trafilatura; None if it found none."""
    extracted = trafilatura.extract(
        raw, output_format="markdown", include_formatting=True, include_comments=False, with_metadata=True
    )
    if not extracted:
        return None
    try:
        post = frontmatter.loads(extracted)
    except yaml.YAMLError:
        return {}, extracted
    return post.metadata, post.content


# ---- the web ----


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
        """(content type, text); raises FetchError. Waits out the origin's Crawl-delay, if it sets one."""
        origin = _origin(url)
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


async def web(
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
        found = [link for link in found if _web_url(link.url)]
        if not found:
            skipped.append(Skipped(url, f"a feed ({feed.version}) with no entries linking to http(s) pages"))
        links += found
        return []
    sitemap = sitemap_from_str(listing.text())
    if isinstance(sitemap, AbstractIndexSitemap):
        return [sub.url for sub in sitemap.sub_sitemaps if _web_url(sub.url)]
    pages = [_Link(page.url) for page in sitemap.all_pages() if _web_url(page.url)]
    if isinstance(sitemap, InvalidSitemap) or not pages:
        skipped.append(Skipped(url, "not a sitemap or an RSS/Atom feed (or one listing no http(s) pages)"))
    links += pages
    return []


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _web_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


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
        extracted = await asyncio.to_thread(_html, raw)
        if extracted is None:
            return Skipped(link.url, "no main text found in the HTML")
        meta, text = extracted
    else:
        return Skipped(link.url, f"not a page ({page.kind})")
    title = _string(meta.get("title")) or link.title or first_heading(text) or link.url
    return Found(link.url, Document(title, link.url, text))
