"""The widget's files over HTTP: content types, security headers, CORS, and the vendored libraries."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatbot.app import create_app
from chatbot.settings import Settings
from chatbot.web import CONTENT_SECURITY_POLICY, WEB_ROOT, setup_web

ALLOWED = "https://shop.example"
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Coroutine[Any, Any, Client]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(**settings: Any) -> Client:
        client = TestClient(TestServer(create_app(Settings(**settings))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_demo_page_has_a_strict_csp(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert re.search(r'<script src="/widget\.js\?v=[0-9a-f]{16}" defer', await response.text())


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/widget.js", "text/javascript; charset=utf-8"),
        ("/widget.css", "text/css; charset=utf-8"),
        ("/vendor/purify.es.mjs", "text/javascript; charset=utf-8"),
        ("/vendor/marked.esm.js", "text/javascript; charset=utf-8"),
        ("/vendor/dompurify.LICENSE", "text/plain; charset=utf-8"),
    ],
)
async def test_static_files_are_served_with_exact_types(make_client: MakeClient, path: str, content_type: str) -> None:
    client = await make_client()
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_no_path_escapes_the_web_folder(make_client: MakeClient) -> None:
    client = await make_client()
    for path in ("/vendor/../../chatbot/web.py", "/%2e%2e/pyproject.toml", "/vendor/", "/index.html"):
        assert (await client.get(path)).status == 404, path


async def test_cors_preflight_for_a_listed_origin(make_client: MakeClient) -> None:
    client = await make_client(cors_origins=(ALLOWED,))
    post = await client.options(
        "/sessions",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert post.status == 200
    assert post.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert post.headers["Access-Control-Allow-Headers"].lower() == "content-type"
    assert "Access-Control-Allow-Credentials" not in post.headers
    # EventSource's own Last-Event-ID needs no preflight, but a fetch()-based client resuming does.
    resume = await client.options(
        "/events/abc",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert resume.status == 200
    assert resume.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_cors_headers_on_answers_and_problems(make_client: MakeClient) -> None:
    client = await make_client(cors_origins=(ALLOWED,))
    created = await client.post("/sessions", json={"message": "hi"}, headers={"Origin": ALLOWED})
    assert created.status == 201
    assert created.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Location" in created.headers["Access-Control-Expose-Headers"]
    missing = await client.get("/sessions/nope", headers={"Origin": ALLOWED})
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == ALLOWED


@pytest.mark.parametrize("origins", [(), (ALLOWED,)])
async def test_other_origins_get_no_cors(make_client: MakeClient, origins: tuple[str, ...]) -> None:
    client = await make_client(cors_origins=origins)
    other = "https://evil.example"
    preflight = await client.options("/sessions", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    response = await client.post("/sessions", json={"message": "hi"}, headers={"Origin": other})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_setup_web_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index\.html"):
        setup_web(web.Application(), Settings(), root=tmp_path)


def test_vendored_files_match_the_recorded_hashes_and_have_licences() -> None:
    vendor = WEB_ROOT / "vendor"
    lines = re.findall(r"^([0-9a-f]{64})  (\S+)$", (vendor / "README.md").read_text(), re.M)
    recorded = {name: digest for digest, name in lines}
    assert set(recorded) == {"purify.es.mjs", "marked.esm.js"}
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (vendor / "dompurify.LICENSE").read_text()
    assert "MIT" in (vendor / "marked.LICENSE").read_text()
    # Pinned: each file's own banner names the version the README records.
    readme = (vendor / "README.md").read_text()
    assert "dompurify 3.4.18" in readme and "DOMPurify 3.4.18 " in (vendor / "purify.es.mjs").read_text()[:200]
    assert "marked 18.2.1" in readme and "marked v18.2.1 " in (vendor / "marked.esm.js").read_text()[:200]


@pytest.mark.parametrize("origins", [(), (ALLOWED,)])
async def test_widget_modules_load_on_any_origin(make_client: MakeClient, origins: tuple[str, ...]) -> None:
    """A page on any origin imports the widget's ES modules (CORS mode); the API stays limited to the list."""
    client = await make_client(cors_origins=origins)
    for path in ("/widget.js", "/widget/main.js", "/widget/render.js", "/vendor/purify.es.mjs", "/widget.css"):
        response = await client.get(path, headers={"Origin": "https://any.example"})
        assert response.status == 200, path
        assert response.headers["Content-Type"].startswith(("text/javascript", "text/css")), path
        assert response.headers["Access-Control-Allow-Origin"] == "*", path
        assert "Access-Control-Allow-Credentials" not in response.headers
    page = await client.get("/", headers={"Origin": "https://any.example"})
    assert "Access-Control-Allow-Origin" not in page.headers
