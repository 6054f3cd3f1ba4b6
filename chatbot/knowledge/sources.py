"""What reading a source gives: documents found, things skipped and why, and the parts folders and the web share."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import frontmatter
import trafilatura
import yaml

from .passages import Document


@dataclass(frozen=True, slots=True)
class Found:
    """A document read from `source` (a file or a URL)."""

    source: str  # the file or URL it was read from
    document: Document


@dataclass(frozen=True, slots=True)
class Skipped:
    """Something not indexed, and why, for the report."""

    source: str
    reason: str


Outcome = Found | Skipped


def main_text(raw: str | bytes) -> tuple[dict[str, object], str] | None:
    """An HTML page's main text as Markdown (headings kept) and its metadata, by trafilatura; None if it found none."""
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


def string(value: object) -> str:
    """A front matter value as stripped text, "" for anything else."""
    return value.strip() if isinstance(value, str) else ""


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def web_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)
