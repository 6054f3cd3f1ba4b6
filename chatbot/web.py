"""The chat widget's files, the demo page, their security headers, and CORS for the API."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp_cors
from aiohttp import web

from .settings import Settings

# A source checkout serves the repo's web/; an installed wheel carries a copy as chatbot/_web.
_PACKAGED = Path(__file__).resolve().parent / "_web"
WEB_ROOT = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "web"

# Model output is rendered on these pages: no inline script, nothing fetched from elsewhere.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
}
PLAIN_TEXT = "text/plain; charset=utf-8"
# The widget is ES modules, which a page on another origin fetches in CORS mode: any page may load
# them (they are public and sent without credentials); the API's own CORS is limited to the listed origins.
PUBLIC_TYPES = (".js", ".mjs", ".css")

# What a cross-origin page may send and read: JSON bodies, resumed event streams, problem details.
CORS_ALLOW_HEADERS = ("Content-Type", "Accept", "Last-Event-ID")
CORS_EXPOSE_HEADERS = ("Location", "Retry-After")
CORS_MAX_AGE_SECONDS = 600

# Caching. Anything the service answers per session (and every problem) is `no-store`, so that no shared
# cache keeps one visitor's answer, status or 204 for another. Static files are cacheable: under their plain
# URL (which embedding sites use) a cache revalidates them with the ETag before each use; under a versioned
# URL (`?v=<hash of the content>`, which the demo page uses) they never change, so a cache keeps them a year.
NO_STORE = "no-store"
REVALIDATE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"
VERSION_CHARS = 16
_LOCAL_REFERENCE = re.compile(r'(src|href)="(/[^"?#]*)"')

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup_web(app: web.Application, settings: Settings, *, root: Path = WEB_ROOT) -> None:
    """Serve `root` (index.html at `/`), then allow CORS for `settings.cors_origins` on every route.

    Call it last in the app factory: CORS covers only the routes that exist at that moment.
    """
    if not (root / "index.html").is_file():
        raise FileNotFoundError(f"the widget's files are missing: no {root / 'index.html'}")
    files = {_url(path, root): path for path in sorted(p for p in root.rglob("*") if p.is_file())}
    versions = {url: version(path.read_bytes()) for url, path in files.items()}
    for url, path in files.items():
        if url == "/":
            app.router.add_get(url, _page_handler(path, versions))
        else:
            app.router.add_get(url, _file_handler(path, versions[url]))
    app.on_response_prepare.append(_no_store_by_default)
    if settings.cors_origins:
        _setup_cors(app, settings.cors_origins, skip=_file_routes(app, root))


def version(content: bytes) -> str:
    """The version a static file is served under: a hash of its content."""
    return hashlib.sha256(content).hexdigest()[:VERSION_CHARS]


def _url(path: Path, root: Path) -> str:
    relative = path.relative_to(root).as_posix()
    return "/" if relative == "index.html" else f"/{relative}"


async def _no_store_by_default(request: web.Request, response: web.StreamResponse) -> None:
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = NO_STORE


def security_headers(content_type: str, *, public: bool = False) -> dict[str, str]:
    """Headers for one served file; pages also get the Content-Security-Policy, `public` files CORS for all."""
    headers = {
        "Content-Type": content_type,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": REVALIDATE,
    }
    if public:
        headers["Access-Control-Allow-Origin"] = "*"
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["Referrer-Policy"] = "no-referrer"
    return headers


def _file_handler(path: Path, current: str) -> Handler:
    """One file, read once: its bytes are what `current` hashes, so the version and the body always agree.

    Served from memory rather than with `FileResponse`, which holds a file open per request and leaked it
    when a browser closed the page mid-transfer; the widget's files are a few tens of KiB in all.
    """
    body = path.read_bytes()
    etag = f'"{current}"'
    headers = {**security_headers(CONTENT_TYPES.get(path.suffix, PLAIN_TEXT), public=path.suffix in PUBLIC_TYPES)}
    headers["ETag"] = etag
    immutable = {**headers, "Cache-Control": IMMUTABLE}
    return _serve_bytes(body, etag, headers, versioned=immutable, current=current)


def _serve_bytes(
    body: bytes, etag: str, headers: dict[str, str], *, versioned: dict[str, str] | None = None, current: str = ""
) -> Handler:
    """Answer with `body`, or 304 when the request's If-None-Match names `etag`.

    Only the current version (`?v=<current>`) gets the `versioned` (immutable) headers: an old `?v=`
    gets today's file, revalidated.
    """

    async def serve(request: web.Request) -> web.StreamResponse:
        chosen = versioned if versioned is not None and request.query.get("v") == current else headers
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": chosen["Cache-Control"]})
        return web.Response(body=body, headers=chosen)

    return serve


def _page_handler(path: Path, versions: dict[str, str]) -> Handler:
    """The demo page, its references to our own files pointed at their current versions."""

    def pin(match: re.Match[str]) -> str:
        attribute, url = match.groups()
        return f'{attribute}="{url}?v={versions[url]}"' if url in versions and url != "/" else match.group(0)

    body = _LOCAL_REFERENCE.sub(pin, path.read_text(encoding="utf-8")).encode()
    etag = f'"{version(body)}"'
    headers = {**security_headers(CONTENT_TYPES[".html"]), "ETag": etag}
    return _serve_bytes(body, etag, headers)


def _file_routes(app: web.Application, root: Path) -> set[str]:
    """The URL paths of the public files under `root` (they carry their own CORS header)."""
    paths = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix in PUBLIC_TYPES}
    return {f"/{path}" for path in paths}


def _setup_cors(app: web.Application, origins: tuple[str, ...], *, skip: set[str]) -> None:
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        allow_methods=("GET", "POST"),
        max_age=CORS_MAX_AGE_SECONDS,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        if route.resource is not None and route.resource.canonical in skip:
            continue
        if route.method != "HEAD":  # aiohttp adds HEAD beside each GET; CORS on the GET covers it
            cors.add(route)
