"""The OpenAPI description is valid, served, complete, and every response the service gives conforms to it."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from openapi_spec_validator import validate as validate_spec
from werkzeug.datastructures import Headers, ImmutableMultiDict
from yarl import URL

from chatbot.settings import Settings
from tests.helpers import create_session, media_type, wait_terminal

pytestmark = pytest.mark.timeout(30)

SPEC_FILE = Path(__file__).resolve().parent.parent / "chatbot" / "openapi.yaml"
METHODS = {"get", "post", "put", "patch", "delete"}


def text(data: bytes) -> str:
    return data.decode("utf-8")


# openapi-core knows application/json; teach it the other media types the service speaks.
CONFIG = Config(
    extra_media_type_deserializers={
        "application/problem+json": json.loads,
        "text/event-stream": text,
        "application/yaml": text,
    }
)


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
    return spec


@dataclass
class SentRequest:
    """openapi-core's Request protocol, for a request the test sent."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass
class ReceivedResponse:
    """openapi-core's Response protocol, for the response the test received."""

    status_code: int
    content_type: str
    headers: Headers
    data: bytes | None


@dataclass
class Recorder:
    """Sends requests through the test client and keeps each exchange for validation against the spec."""

    client: TestClient[Any, Any]
    exchanges: list[tuple[SentRequest, ReceivedResponse]] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> ReceivedResponse:
        headers = dict(headers or {})
        body = data
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        async with self.client.request(method, path, data=body, headers=headers, params=params) as resp:
            raw = await resp.read()
            received = ReceivedResponse(
                status_code=resp.status,
                content_type=(resp.headers.get("Content-Type") or "").lower(),
                headers=Headers(list(resp.headers.items())),
                data=raw,
            )
        url = URL(path)
        sent = SentRequest(
            host_url=str(self.client.make_url("/")).rstrip("/"),
            path=url.path,
            method=method.lower(),
            parameters=RequestParameters(
                query=ImmutableMultiDict(list((params or {}).items())),
                header=Headers(list(headers.items())),
            ),
            content_type=(content_type or "").lower(),
            body=body,
        )
        self.exchanges.append((sent, received))
        return received


def test_spec_is_valid_openapi() -> None:
    spec = load_spec()
    validate_spec(spec)
    assert spec["openapi"].startswith("3.")


def widget_asset_paths() -> set[str]:
    """URL paths of the widget's static files (index.html at `/`), which the API description leaves out."""
    from chatbot.web import WEB_ROOT

    paths = set()
    for file in WEB_ROOT.rglob("*"):
        if file.is_file():
            relative = file.relative_to(WEB_ROOT).as_posix()
            paths.add("/" if relative == "index.html" else f"/{relative}")
    assert paths, "no widget files found"
    return paths


def normalise(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_route_is_documented_and_vice_versa() -> None:
    from chatbot.app import create_app

    app = create_app(Settings())  # only its routes are looked at: it is never started
    spec = load_spec()
    documented = {
        (method.upper(), normalise(path))
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }
    served = set()
    assets = widget_asset_paths()
    for route in app.router.routes():
        if route.method in {"HEAD", "OPTIONS", "*"}:
            continue  # aiohttp adds HEAD for GET; CORS preflight is not part of the API
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path, f"route without a path: {route}"
        if route.method == "GET" and path in assets:
            continue  # the chat widget's static files are a web page, not part of the HTTP API
        served.add((route.method, normalise(path)))
    assert served == documented, f"undocumented: {served - documented}; not served: {documented - served}"


async def test_served_description_is_the_file(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/openapi.yaml")
    assert resp.status == 200
    assert "yaml" in media_type(resp.headers.get("Content-Type"))
    assert yaml.safe_load(await resp.read()) == load_spec()


async def test_responses_conform_to_spec(client: TestClient[Any, Any]) -> None:
    openapi = OpenAPI.from_dict(load_spec(), config=CONFIG)
    rec = Recorder(client)
    unknown = secrets.token_urlsafe(16)

    created = await create_session(client, "first")
    stream = await wait_terminal(client, created["id"])
    ids = [e.id or "" for e in stream.events]
    sid = created["id"]

    # successes
    await rec.call("POST", "/sessions", json_body={"message": "hello"})
    await rec.call("POST", "/sessions", json_body={"message": "again", "conversation_id": created["conversation_id"]})
    await rec.call("GET", f"/sessions/{sid}")
    await rec.call("GET", f"/events/{sid}")
    await rec.call("GET", f"/events/{sid}", headers={"Last-Event-ID": ids[1]})
    await rec.call("GET", f"/events/{sid}", params={"last_event_id": ids[1]})
    await rec.call("GET", f"/events/{sid}", headers={"Last-Event-ID": ids[-1]})
    await rec.call("POST", f"/sessions/{sid}/cancel")
    await rec.call("GET", "/healthz")
    await rec.call("GET", "/readyz")
    await rec.call("GET", "/openapi.yaml")
    # errors
    await rec.call("POST", "/sessions", data=b"{", content_type="application/json")
    await rec.call("POST", "/sessions", data=b'{"message": "hi"}', content_type="text/plain")
    await rec.call("POST", "/sessions", json_body={"message": " "})
    await rec.call("POST", "/sessions", json_body={"message": "x" * 10})  # fine, under the limit
    await rec.call("POST", "/sessions", data=b'{"message": "' + b"x" * 40_000 + b'"}', content_type="application/json")
    await rec.call("POST", "/sessions", json_body={"message": "hi", "conversation_id": unknown})
    await rec.call("GET", f"/sessions/{unknown}")
    await rec.call("POST", f"/sessions/{unknown}/cancel")
    await rec.call("GET", f"/events/{unknown}")
    await rec.call("GET", f"/events/{sid}", headers={"Last-Event-ID": "nope"})
    await rec.call("GET", f"/events/{sid}", headers={"Last-Event-ID": "1-0"})

    statuses = sorted({(s.method, s.path.split("/")[1], r.status_code) for s, r in rec.exchanges})
    expected = {201, 200, 204, 202, 400, 404, 409, 413, 415, 422}
    assert expected <= {r.status_code for _, r in rec.exchanges}, statuses
    failures = []
    for sent, received in rec.exchanges:
        try:
            openapi.validate_response(sent, received)
        except Exception as exc:  # collect all, report together
            where = f"{sent.method.upper()} {sent.path} -> {received.status_code} {received.content_type}"
            failures.append(f"{where}: {exc!r} caused by {exc.__cause__!r}")
        if received.status_code < 400:
            try:
                openapi.validate_request(sent)
            except Exception as exc:
                failures.append(f"request {sent.method.upper()} {sent.path}: {exc!r}")
    assert not failures, "\n".join(failures)


async def test_validator_is_not_vacuous() -> None:
    """A response that breaks the spec is caught, so the test above can fail."""
    openapi = OpenAPI.from_dict(load_spec(), config=CONFIG)
    sent = SentRequest("http://x", "/sessions/abc", "get", RequestParameters(), "", None)
    bad = ReceivedResponse(
        200, "application/json", Headers([("Content-Type", "application/json")]), b'{"id": "abc", "status": "weird"}'
    )
    with pytest.raises(OpenAPIError):
        openapi.validate_response(sent, bad)
