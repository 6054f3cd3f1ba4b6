# ruff: noqa: F811  (the fixtures imported from test_providers_upstream are parameters here)
"""docs/providers.md's table of error codes, held row by row: each code is produced for real, with its
documented `retryable`, and the table, the OpenAPI description and the produced codes are the same set."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from chatbot import ids, keys
from chatbot.app import create_app
from chatbot.appkeys import STORE
from chatbot.providers import Finish, Message
from tests.conftest import ROOT, make_settings
from tests.helpers import create_session, first_event, wait_terminal
from tests.providers_fakes import FakeUpstream, Reply, openai_events
from tests.test_providers_upstream import (  # noqa: F401  (fixtures)
    error_payload,
    provider_settings,
    serve,
    upstream,
)

pytestmark = pytest.mark.timeout(40)
Client = TestClient[Any, Any]


def documented_rows() -> dict[str, bool]:
    """`code` → `retryable` from the table under "## Errors" in docs/providers.md."""
    text = (ROOT / "docs" / "providers.md").read_text(encoding="utf-8")
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", section, flags=re.MULTILINE)
    return {code: retryable == "yes" for code, retryable in rows}


ROWS = documented_rows()


class Slow:
    """A model that writes one word every `delay` seconds for a long time, or a list where text belongs."""

    name = "slow"

    def __init__(self, *, wrong: bool = False) -> None:
        self.wrong = wrong

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[Any]:
        if self.wrong:
            yield [{"type": "text", "text": "not a string"}]
        for _ in range(400):
            await asyncio.sleep(0.05)
            yield "word "
        yield Finish("stop")

    async def aclose(self) -> None:
        return None


Scenario = Callable[[FakeUpstream, pytest.MonkeyPatch, Any, str], Awaitable[dict[str, Any]]]


def via_openai(reply: Reply, **settings: Any) -> Scenario:
    async def run(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str) -> Any:
        upstream.script(reply)
        client = await serve(provider_settings("openai", upstream, monkeypatch, upstream_max_retries=0, **settings))
        created = await create_session(client, "Hi")
        return error_payload(await wait_terminal(client, created["id"]))

    return run


async def internal_error(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str) -> Any:
    async with TestClient(TestServer(create_app(make_settings("redis", redis_url), provider=Slow(wrong=True)))) as c:
        return error_payload(await wait_terminal(c, (await create_session(c, "Hi"))["id"]))


async def producer_lost(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str) -> Any:
    settings = make_settings("redis", redis_url, lease_ttl_seconds=0.5)
    async with TestClient(TestServer(create_app(settings))) as client:
        store = client.app[STORE]
        sid = ids.new_id()
        await store.create_session(sid, ids.new_id(), "an answer whose producer died at once")
        await store.redis.delete(keys.lease(sid))
        return error_payload(await wait_terminal(client, sid))


async def server_shutdown(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str) -> Any:
    settings = make_settings("redis", redis_url, shutdown_grace_seconds=0.2)
    first: Client = TestClient(TestServer(create_app(settings, provider=Slow())))
    await first.start_server()
    created = await create_session(first, "Hi")
    await first_event(first, created["id"])
    await first.close()  # the grace passes; the answer still running ends with its error
    async with TestClient(TestServer(create_app(settings, provider=Slow()))) as second:
        return error_payload(await wait_terminal(second, created["id"]))


SCENARIOS: dict[str, Scenario] = {
    "upstream_auth": via_openai(Reply(status=401)),
    "upstream_rate_limited": via_openai(Reply(status=429)),
    "upstream_unavailable": via_openai(Reply(status=503)),
    "upstream_timeout": via_openai(Reply(openai_events(["Hi"])[:2], then="stall"), upstream_idle_timeout_seconds=0.5),
    "upstream_disconnected": via_openai(Reply(openai_events(["Hi", "there"])[:3], then="drop")),
    "upstream_rejected": via_openai(Reply(status=400)),
    "upstream_bad_response": via_openai(Reply([b"<html>proxy</html>"], headers={"Content-Type": "text/html"})),
    "upstream_error": via_openai(Reply([b'data: {"error":{"message":"The model crashed"}}\n\n'])),
    "empty_answer": via_openai(Reply([b"data: [DONE]\n\n"])),
    "internal_error": internal_error,
    "producer_lost": producer_lost,
    "server_shutdown": server_shutdown,
}
# Codes whose cause needs Redis to lose data: produced for real by the named test (store_data_lost also by
# tests/test_lost_replies.py, on one Redis restarted from an older snapshot).
HELD_ELSEWHERE = {
    "store_data_lost": "test_cluster.py::test_a_failover_that_lost_the_tail_ends_the_session_with_a_retryable_error",
}


def test_the_table_the_api_description_and_the_tests_name_the_same_codes() -> None:
    spec = yaml.safe_load((ROOT / "chatbot" / "openapi.yaml").read_text(encoding="utf-8"))
    described = spec["components"]["schemas"]["ErrorEvent"]["properties"]["code"]["enum"]
    assert len(ROWS) >= 12
    assert set(ROWS) == set(described) == set(SCENARIOS) | set(HELD_ELSEWHERE)
    assert not set(SCENARIOS) & set(HELD_ELSEWHERE)
    finish = spec["components"]["schemas"]["DoneEvent"]["properties"]["finish_reason"]["enum"]
    assert set(finish) == {"stop", "length", "content_filter", "cancelled"}


@pytest.mark.parametrize("code", sorted(set(ROWS) - set(HELD_ELSEWHERE)))
async def test_each_documented_code_is_produced_with_its_retryable(
    code: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str
) -> None:
    error = await SCENARIOS[code](upstream, monkeypatch, serve, redis_url)
    assert error["code"] == code, error
    assert error["retryable"] is ROWS[code], error
    assert isinstance(error["message"], str) and error["message"]
