"""`chatbot index`: folders, sitemaps and feeds from a local server, passages, safe queries, bad sources.

Web sources are served by an aiohttp server on 127.0.0.1 that this module starts; it records each
request's User-Agent and how many were in flight at once.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.typedefs import Handler

from chatbot import cli
from chatbot.knowledge import crawl, folder, index, indexer
from chatbot.knowledge.passages import Document, split
from chatbot.knowledge.retriever import Knowledge, query_terms
from chatbot.knowledge.sources import Found, Skipped
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(30)

SITE = Path(__file__).resolve().parent / "data" / "site"
BASE = "https://ines.example"


# ---- passages and queries (pure) ----


def test_a_document_splits_along_its_headings_and_keeps_the_heading_path() -> None:
    text = (
        "# Tidepool\n\nIntro text.\n\n## Install\n\nRun cargo.\n\n### On a Pi\n\nUse aarch64.\n\n"
        "```sh\n# a shell comment, not a heading\necho hi\n```\n\n## Accuracy\n\nWithin 4 cm.\u2028Still one line."
    )
    passages = split(Document("Tidepool", "https://x.example/t", text))
    assert [(p.heading, p.text.split("\n")[0]) for p in passages] == [
        ("", "Intro text."),
        ("Install", "Run cargo."),
        ("Install › On a Pi", "Use aarch64."),
        ("Accuracy", "Within 4 cm.\u2028Still one line."),
    ]
    assert "# a shell comment, not a heading" in passages[2].text
    assert {(p.title, p.url) for p in passages} == {("Tidepool", "https://x.example/t")}


def test_a_long_section_is_cut_at_paragraphs_into_passages_within_the_limit() -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(10)]
    passages = split(Document("T", "https://x.example/", "## Long\n\n" + "\n\n".join(paragraphs)), max_chars=700)
    assert len(passages) > 3
    assert all(len(p.text) <= 700 for p in passages)
    assert " ".join(p.text for p in passages).split() == " ".join(paragraphs).split()


HOSTILE = [
    'say "hello',
    '"',
    "tide AND NOT moon OR",
    "NEAR(tide moon, 2)",
    "tide* ^moon -sun +star title:x {title}: x",
    "(((",
    "what is the",  # only stop words
    "?!…—",
    "",
    "\x00\x01 null",
    "日本語の潮汐は？",
    "ترجمة المد والجزر",
    "😀👩‍👩‍👧",
    "café ﬁle",  # composed é and the ligature ﬁ
    "x" * 5000,
    " ".join(f"word{i}" for i in range(500)),
    "_ __ ___",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_any_text_makes_a_valid_query(text: str, tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite3"
    doc = Document("Café notes", "https://x.example/cafe", "# Café\n\nThe cafe file about tide and moon. 日本語の潮汐")
    index.write(path, split(doc), documents=1)
    connection = index.open_index(path)
    try:
        words = query_terms(text)
        assert len(words) <= index.MAX_TERMS
        hits = index.search(connection, words, limit=5)
        assert all(hit.passage.url == "https://x.example/cafe" for hit in hits)
    finally:
        connection.close()


def test_accents_ligatures_and_word_forms_still_match(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite3"
    index.write(path, split(Document("Notes", "https://x.example/n", "# Notes\n\nThe café keeps files.")), documents=1)
    connection = index.open_index(path)
    try:
        for question in ("cafe", "CAFÉ", "cafe\u0301", "ﬁle", "filing"):
            assert index.search(connection, query_terms(question), limit=5), question
        assert index.search(connection, query_terms("what is the"), limit=5) == []
    finally:
        connection.close()


# ---- folders ----


def test_cli_indexes_a_folder_of_markdown_posts_and_reports_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "knowledge.sqlite3"
    assert cli.main(["index", str(SITE), "--base-url", BASE, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("indexed 33 documents: ")
    assert f"{BASE}/posts/gullwing-firmware  ({SITE}/posts/gullwing-firmware.md)" in printed
    assert f"{BASE}/uses/  ({SITE}/uses.md)" in printed  # the front matter's permalink
    assert f"{BASE}/projects/  ({SITE}/projects/index.md)" in printed
    assert f"wrote {out}" in printed
    connection = index.open_index(out)
    try:
        rows = connection.execute(
            "SELECT title, heading FROM passages WHERE url = ?", (f"{BASE}/posts/gullwing-firmware",)
        )
        # The page's own heading differs from its front matter's title, so it leads the heading path.
        assert ("Home-row mods on the Gullwing", "Home-row modifiers › Flashing") in rows.fetchall()
    finally:
        connection.close()


def test_folder_files_without_a_url_drafts_bad_yaml_and_other_types_are_skipped_with_reasons(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "notes").mkdir(parents=True)
    (site / "a.md").write_text("---\ntitle: A\nurl: https://a.example/a/\n---\nText of a.\n")
    (site / "b.md").write_text("# B\n\nNo URL for me.\n")
    (site / "draft.md").write_text("---\ntitle: D\nurl: https://a.example/d\ndraft: true\n---\nSecret.\n")
    (site / "broken.md").write_text("---\ntitle: [unclosed\n---\nText.\n")
    (site / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (site / "notes" / "plain.txt").write_text("Plain title\n\nA plain text note.\n")
    (site / "logo.png").write_bytes(b"\x89PNG")
    (site / "page.html").write_text(
        PAGE.format(title="Choosing an anchor", body=PAGES["/posts/anchors.html"][1], details="x")
    )
    (site / ".hidden.md").write_text("# Hidden\n")
    (site / "script.md").write_text("---\npermalink: javascript:alert(1)\n---\n# Script\n\nText.\n")
    found = list(folder.read(site, base_url=None))
    by_source = {Path(o.source).name: o for o in found}
    assert isinstance(by_source["a.md"], Found)
    assert by_source["a.md"].document == Document("A", "https://a.example/a/", "Text of a.")
    assert isinstance(by_source["b.md"], Skipped) and "--base-url" in by_source["b.md"].reason
    assert by_source["draft.md"] == Skipped(str(site / "draft.md"), "draft: true")
    assert "front matter is not valid YAML" in by_source["broken.md"].reason  # type: ignore[union-attr]
    assert by_source["latin1.txt"] == Skipped(str(site / "latin1.txt"), "not UTF-8 text")
    assert "1 files of other types" in by_source["site"].reason  # type: ignore[union-attr]
    assert ".hidden.md" not in by_source
    with_base = {Path(o.source).name: o for o in folder.read(site, base_url="https://a.example/blog")}
    assert with_base["script.md"] == Skipped(
        str(site / "script.md"), "its URL 'javascript:alert(1)' is not an http(s) URL"
    )
    html = with_base["page.html"]
    assert isinstance(html, Found)
    assert html.document.title == "Choosing an anchor" and html.document.url == "https://a.example/blog/page.html"
    assert "Rocna anchor" in html.document.text and "Cookie settings" not in html.document.text
    plain = with_base["plain.txt"]
    assert isinstance(plain, Found)
    assert plain.document.title == "Plain title"
    assert plain.document.url == "https://a.example/blog/notes/plain"


# ---- the web ----


PAGE = """<!doctype html><html><head><title>{title} | Ines</title></head><body>
<nav><a href="/">Home</a> <a href="/about">About</a> Subscribe to the newsletter</nav>
<article><h1>{title}</h1><p>{body}</p><h2>Details</h2><p>{details}</p></article>
<footer>Copyright Ines Varga. Cookie settings. Privacy policy.</footer></body></html>"""

PAGES = {
    "/posts/anchors.html": ("Choosing an anchor", "A Rocna anchor of 10 kg holds Mala in the sandy bays of Vis."),
    "/posts/bees.html": ("Winter bees", "Bees cluster around the queen and shiver to keep the hive at 20 °C."),
    "/posts/sails.html": ("New sails", "The new mainsail is made of Dacron and has two reef points."),
    "/private/diary.html": ("Private diary", "Nobody should index the secret diary."),
    "/slow.html": ("Slow page", "This page answers too late."),
}

SITEMAP_INDEX = """<?xml version="1.0" encoding="UTF-8"?>
<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>{base}/sitemap-posts.xml</loc></sitemap>
</sitemapindex>"""

SITEMAP = """<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
{urls}
</urlset>"""

FEED = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Ines Varga</title><id>urn:ines</id><updated>2024-08-12T00:00:00Z</updated>
  <entry><title>New sails</title><id>urn:sails</id><updated>2024-08-12T00:00:00Z</updated>
    <link href="{base}/posts/sails.html"/></entry>
  <entry><title>Winter bees</title><id>urn:bees</id><updated>2024-01-12T00:00:00Z</updated>
    <link href="{base}/posts/bees.html"/></entry>
</feed>"""


@dataclass
class Site:
    """A small website on 127.0.0.1: robots.txt, a sitemap index, a feed, pages, and bad sources."""

    url: str = ""
    agents: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    robots: str = "User-agent: *\nDisallow: /private/\n"
    robots_status: int = 200


@pytest_asyncio.fixture
async def site() -> AsyncIterator[Site]:
    state = Site()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        state.agents.append(request.headers.get("User-Agent", ""))
        state.times.append(time.monotonic())
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.02)  # long enough for requests to overlap if the client sends them together
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            state.in_flight -= 1

    def xml(text: str) -> Handler:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(text=text.format(base=state.url), content_type="application/xml")

        return handler

    async def gzipped(_: web.Request) -> web.Response:
        urls = f"<url><loc>{state.url}/posts/bees.html</loc></url>"
        return web.Response(body=gzip.compress(SITEMAP.format(urls=urls).encode()), content_type="application/gzip")

    legacy = "<html><head><meta charset='windows-1252'><title>Caf\xe9</title></head><body><article><h1>Caf\xe9</h1>"
    legacy += "<p>The caf\xe9 on the quay sells na\xefve paintings of boats and a r\xe9sum\xe9 of the harbour.</p>"
    legacy += "</article></body></html>"

    async def cp1252(_: web.Request) -> web.Response:  # the charset only in the page's <meta>
        return web.Response(body=legacy.encode("cp1252"), headers={"Content-Type": "text/html"})

    async def unknown_charset(_: web.Request) -> web.Response:
        body = legacy.replace("windows-1252", "utf-8").encode()
        return web.Response(body=body, headers={"Content-Type": "text/html; charset=klingon"})

    async def robots(_: web.Request) -> web.Response:
        return web.Response(status=state.robots_status, text=state.robots)

    async def not_a_feed(_: web.Request) -> web.Response:
        return web.Response(text="{this is: not xml <<", content_type="text/xml")

    async def page(request: web.Request) -> web.Response:
        if request.path == "/slow.html":
            # Answers nothing until the client gives up and leaves (or the test ends).
            while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            raise ConnectionResetError
        title, body = PAGES[request.path]
        details = f"More about {title.lower()}: " + "the details matter here. " * 5
        return web.Response(text=PAGE.format(title=title, body=body, details=details), content_type="text/html")

    urls = "\n".join(f"  <url><loc>{{base}}{path}</loc></url>" for path in [*PAGES, "/gone.html"])
    app = web.Application(middlewares=[count])
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/sitemap.xml", xml(SITEMAP_INDEX))
    app.router.add_get("/sitemap-posts.xml", xml(SITEMAP.format(urls=urls)))
    app.router.add_get("/feed.xml", xml(FEED))
    app.router.add_get("/sitemap-small.xml.gz", gzipped)
    app.router.add_get(
        "/charsets.xml",
        xml(SITEMAP.format(urls="<url><loc>{base}/cp1252</loc></url><url><loc>{base}/klingon</loc></url>")),
    )
    app.router.add_get("/loop.xml", xml(SITEMAP_INDEX.replace("sitemap-posts.xml", "loop.xml")))
    relative = '<rss version="2.0"><channel><title>I</title><item><title>Bees</title><link>/posts/bees.html</link>'
    app.router.add_get("/relative.rss", xml(relative + "</item></channel></rss>"))
    app.router.add_get("/cp1252", cp1252)
    app.router.add_get("/klingon", unknown_charset)
    app.router.add_get("/not-a-feed.xml", not_a_feed)
    for path in PAGES:
        app.router.add_get(path, page)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_a_sitemap_index_and_a_feed_are_fetched_politely_and_bad_sources_reported(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "knowledge.sqlite3"
    sources = [
        f"{site.url}/sitemap.xml",
        f"{site.url}/feed.xml",
        f"{site.url}/not-a-feed.xml",
        str(tmp_path / "no-such-folder"),
        "ftp://example.invalid/feed",
    ]
    options = indexer.Options(out=out, timeout=0.5, concurrency=2)
    report = await indexer.run(sources, options)

    indexed = sorted(found.document.url for found in report.documents)
    assert indexed == [f"{site.url}/posts/{name}.html" for name in ("anchors", "bees", "sails")]
    reasons = {item.source: item.reason for item in report.skipped}
    assert reasons[f"{site.url}/private/diary.html"] == "disallowed by robots.txt"
    assert reasons[f"{site.url}/slow.html"] == "no complete answer within 0.5 s"
    assert reasons[f"{site.url}/gone.html"] == "HTTP 404"
    assert reasons[f"{site.url}/not-a-feed.xml"].startswith("not a sitemap or an RSS/Atom feed")
    assert reasons[str(tmp_path / "no-such-folder")] == "no such folder"
    assert reasons["ftp://example.invalid/feed"] == "only http and https URLs can be fetched"
    assert len(report.skipped) == 6 + 2  # the feed's two pages were read from the sitemap already

    assert set(site.agents) == {crawl.USER_AGENT}
    assert site.most_in_flight == 2  # a few at once, never more
    printed = indexer.summary(report, out)
    assert f"  {site.url}/private/diary.html: disallowed by robots.txt" in printed

    connection = index.open_index(out)
    try:
        rows = connection.execute("SELECT title, heading, body FROM passages WHERE url LIKE '%anchors.html'").fetchall()
    finally:
        connection.close()
    assert rows and rows[0][0] == "Choosing an anchor"
    text = " ".join(body for _, _, body in rows)
    assert "Rocna anchor of 10 kg" in text
    assert "Cookie settings" not in text and "newsletter" not in text  # the main text only
    assert "Details" in {heading for _, heading, _ in rows}


@pytest.mark.parametrize(("status", "indexed"), [(503, 0), (404, 3)])
async def test_a_robots_txt_that_fails_allows_nothing_and_a_missing_one_everything(
    site: Site, tmp_path: Path, status: int, indexed: int
) -> None:
    site.robots_status = status  # RFC 9309: 5xx is "unreachable" (fetch nothing), 4xx is "no rules"
    report = await indexer.run([f"{site.url}/feed.xml"], indexer.Options(out=tmp_path / "k.sqlite3", timeout=0.5))
    assert len(report.documents) == {503: 0, 404: 2}[status]
    if status == 503:
        assert [item.reason for item in report.skipped] == [
            f"robots.txt unreadable (HTTP 503), so nothing is fetched from {site.url}"
        ]
    del indexed


async def test_a_site_that_refuses_connections_is_reported(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/sitemap.xml"
    report = await indexer.run([url], indexer.Options(out=tmp_path / "k.sqlite3", timeout=2))
    (skipped,) = report.skipped
    assert skipped.source == url
    assert skipped.reason.startswith("robots.txt unreadable (ClientConnectorError")
    assert not (tmp_path / "k.sqlite3").exists()


async def test_pages_in_legacy_or_unknown_charsets_are_read(site: Site, tmp_path: Path) -> None:
    report = await indexer.run([f"{site.url}/charsets.xml"], indexer.Options(out=tmp_path / "k.sqlite3"))
    assert not report.skipped
    texts = sorted(found.document.text for found in report.documents)
    assert len(texts) == 2
    assert all("The café on the quay sells naïve paintings" in text for text in texts), texts


async def test_a_sitemap_index_that_lists_itself_ends_and_a_feeds_relative_links_resolve(
    site: Site, tmp_path: Path
) -> None:
    sources = [f"{site.url}/loop.xml", f"{site.url}/relative.rss"]
    report = await indexer.run(sources, indexer.Options(out=tmp_path / "k.sqlite3"))
    assert [found.document.url for found in report.documents] == [f"{site.url}/posts/bees.html"]
    assert [(item.source, item.reason) for item in report.skipped] == [(sources[0], "lists no pages")]
    assert site.agents.count(crawl.USER_AGENT) == 4  # robots.txt, loop.xml once, the feed, the page


async def test_a_gzipped_sitemap_is_read(site: Site, tmp_path: Path) -> None:
    report = await indexer.run([f"{site.url}/sitemap-small.xml.gz"], indexer.Options(out=tmp_path / "k.sqlite3"))
    assert [found.document.title for found in report.documents] == ["Winter bees"]


async def test_a_crawl_delay_spaces_the_requests_to_the_site(site: Site, tmp_path: Path) -> None:
    site.robots = "User-agent: *\nCrawl-delay: 0.25\n"
    report = await indexer.run([f"{site.url}/feed.xml"], indexer.Options(out=tmp_path / "k.sqlite3", concurrency=4))
    assert len(report.documents) == 2
    after_robots = site.times[1:]  # the feed, then its two pages
    assert len(after_robots) == 3
    assert all(later - earlier >= 0.24 for earlier, later in itertools.pairwise(after_robots))


def test_nothing_read_leaves_the_old_index_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "knowledge.sqlite3"
    assert cli.main(["index", str(SITE), "--base-url", BASE, "--out", str(out)]) == 0
    before = out.stat().st_ino
    assert cli.main(["index", str(tmp_path / "missing"), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"  {tmp_path / 'missing'}: no such folder" in printed
    assert f"nothing to index: {out} left as it was" in printed
    assert out.stat().st_ino == before
    assert Knowledge(out, max_chars=1000).search(query_terms("Gullwing firmware")).sources


def test_reindexing_replaces_the_file_atomically_for_a_reader_that_has_it_open(tmp_path: Path) -> None:
    out = tmp_path / "knowledge.sqlite3"
    index.write(out, split(Document("Old", "https://x.example/old", "# Old\n\nlighthouse keeper")), documents=1)
    reader = index.open_index(out)
    index.write(out, split(Document("New", "https://x.example/new", "# New\n\nlighthouse lens")), documents=1)
    try:
        old = index.search(reader, ["lighthouse"], limit=5)
        assert [hit.passage.url for hit in old] == ["https://x.example/old"]  # the open one is whole
    finally:
        reader.close()
    assert [p.name for p in tmp_path.iterdir()] == ["knowledge.sqlite3"]  # no temporary file left
    fresh = index.open_index(out)
    try:
        assert [hit.passage.url for hit in index.search(fresh, ["lighthouse"], limit=5)] == ["https://x.example/new"]
    finally:
        fresh.close()


@pytest.mark.parametrize("content", [b"", b"not sqlite at all", None])
def test_a_file_that_is_not_an_index_is_refused_with_a_reason(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "k.sqlite3"
    if content is not None:
        path.write_bytes(content)
    elif True:
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.close()
    with pytest.raises(index.BadIndex):
        index.open_index(path)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_is_one_rewritten_line_on_a_terminal_and_nothing_elsewhere(site: Site, tmp_path: Path) -> None:
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        await indexer.run([f"{site.url}/feed.xml"], indexer.Options(out=tmp_path / "k.sqlite3"), progress=stream)
    assert pipe.getvalue() == ""
    shown = terminal.getvalue()
    assert f"\r\x1b[K{site.url}/feed.xml: 2/2 pages" in shown
    assert shown.endswith("\r\x1b[K") and "\n" not in shown


BAD_OPTIONS = [
    ["--timeout", "0"],
    ["--timeout", "nan"],
    ["--concurrency", "-1"],
    ["--max-pages", "0"],
    ["--base-url", "x"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS)
def test_bad_options_stop_the_command_before_anything_is_read(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.sqlite3"
    try:
        code = cli.main(["index", str(SITE), "--out", str(out), *args])
    except SystemExit as exc:  # argparse's way of refusing an option
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert args[0] in capsys.readouterr().err
    assert not out.exists()
