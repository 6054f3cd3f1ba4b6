"""Documents from a folder: Markdown and text files (with front matter), and HTML files reduced to main text."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlsplit

import frontmatter
import yaml

from .passages import Document, first_heading
from .sources import Found, Outcome, Skipped, main_text, string, web_url

MARKDOWN = frozenset({".md", ".markdown"})
HTML = frozenset({".html", ".htm"})
TEXT = frozenset({".txt"})


def read(root: str | Path, *, base_url: str | None) -> Iterator[Outcome]:
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
            page = main_text(raw)
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
    title = string(meta.get("title")) or first_heading(text) or _first_line(text) or path.stem
    url = _file_url(meta, relative, base_url)
    if url is None:
        return Skipped(str(path), "no URL: give --base-url, or `url`/`permalink` in its front matter")
    if not web_url(url):
        return Skipped(str(path), f"its URL {url!r} is not an http(s) URL")
    if not text.strip():
        return Skipped(str(path), "empty")
    return Found(str(path), Document(title, url, text))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")[:200]


def _file_url(meta: dict[str, object], relative: Path, base_url: str | None) -> str | None:
    """Front matter's `url` or `permalink` (absolute, or joined to base_url), else base_url + the file's path:
    `posts/a.md` → `posts/a`, `docs/index.md` → `docs/`, HTML files keep their name."""
    given = string(meta.get("url")) or string(meta.get("permalink"))
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
