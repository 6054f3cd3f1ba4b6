"""Answers grounded in the site's index, over HTTP: what the upstream receives, the `sources` event, reloads.

The upstreams are the fake OpenAI and Anthropic servers of tests/providers_fakes.py; the index is built
from the fixture site (tests/data/site) by the same code `chatbot index` runs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from chatbot import cli, history
from chatbot.knowledge import indexer
from tests.helpers import create_session, get_session, read_stream, text_of, wait_terminal
from tests.providers_fakes import FakeUpstream, Reply
from tests.test_providers_upstream import api, events_for, provider_settings, serve, upstream

__all__ = ["api", "serve", "upstream"]  # fixtures shared with the provider tests

pytestmark = pytest.mark.timeout(30)

SITE = Path(__file__).resolve().parent / "data" / "site"
BASE = "https://ines.example"
FLASHING = "Hold the left half's reset button while plugging in, and the RP2040 appears as a USB drive."


async def build(sources: list[str], out: Path, base_url: str | None = BASE) -> Path:
    report = await indexer.run(sources, indexer.Options(out=out, base_url=base_url))
    assert report.documents and not [s for s in report.skipped if "other types" not in s.reason], report.skipped
    return out


def system_text(api: str, request: dict[str, Any]) -> str:
    """The system message the upstream received, in either API's place for it."""
    if api == "anthropic":
        system = request.get("system", "")
        return system if isinstance(system, str) else "".join(block["text"] for block in system)
    return "".join(m["content"] for m in request["messages"] if m["role"] == "system")


def sources_of(stream: Any) -> list[dict[str, str]]:
    found = [event.json()["sources"] for event in stream.events if event.type == "sources"]
    assert len(found) <= 1
    return found[0] if found else []


async def test_a_post_that_answers_the_question_reaches_the_upstream_and_the_sources_event(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, redis_url: str, tmp_path: Path
) -> None:
    index = await build([str(SITE)], tmp_path / "knowledge.sqlite3")
    upstream.script(Reply(events_for(api)(["Hold reset ", "and copy the file."])))
    settings = provider_settings(
        api, upstream, monkeypatch, redis_url=redis_url, knowledge=str(index), system_prompt="You are Ines's site."
    )
    client = await serve(settings)
    created = await create_session(client, "How do I flash new firmware onto the RP2040 of the split keyboard?")
    stream = await wait_terminal(client, created["id"])

    assert [e.type for e in stream.events[:2]] == ["sources", "token"]
    sources = sources_of(stream)
    assert sources[0] == {"title": "Home-row mods on the Gullwing", "url": f"{BASE}/posts/gullwing-firmware"}
    assert len({s["url"] for s in sources}) == len(sources)
    assert text_of(stream.events) == "Hold reset and copy the file."

    system = system_text(api, upstream.requests[0])
    assert system.startswith("You are Ines's site.\n\n" + history.GROUNDING)
    assert FLASHING in system
    assert f'url="{BASE}/posts/gullwing-firmware" section="Home-row modifiers › Flashing"' in system
    assert len(system) < settings.knowledge_max_chars + 2000

    session = await get_session(client, created["id"])
    assert session["sources"] == sources and session["text"] == "Hold reset and copy the file."
    # Stored and resumable like the tokens: after the sources event only the rest; from the start all of it.
    rest = await read_stream(client, created["id"], last_event_id=stream.events[0].id)
    assert [e.id for e in rest.events] == [e.id for e in stream.events[1:]]
    again = await read_stream(client, created["id"], last_event_id=stream.events[1].id, by="query")
    assert "sources" not in {e.type for e in again.events}


async def test_a_question_that_matches_nothing_has_no_sources_and_an_answer_all_the_same(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, tmp_path: Path
) -> None:
    index = await build([str(SITE)], tmp_path / "knowledge.sqlite3")
    upstream.script(Reply(events_for(api)(["The site does not say."])))
    client = await serve(provider_settings(api, upstream, monkeypatch, knowledge=str(index)))
    for question in ("Zxqv plorth gnarf?", "What is the?", '"" AND NOT (*)'):
        created = await create_session(client, question)
        stream = await wait_terminal(client, created["id"])
        assert [e.type for e in stream.events] == ["token", "done"], question
        assert (await get_session(client, created["id"]))["sources"] == []
        assert system_text(api, upstream.requests[-1]) == history.NOTHING_FOUND


async def test_reindexing_while_the_service_runs_changes_the_next_answers_sources(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, tmp_path: Path
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "lens.md").write_text("---\ntitle: The old lens\n---\nThe lighthouse lens was ground in 1890.\n")
    (new / "lens.md").write_text("---\ntitle: The new lens\n---\nThe lighthouse lens is an LED array now.\n")
    index = await build([str(old)], tmp_path / "knowledge.sqlite3", base_url="https://old.example")
    upstream.script(Reply(events_for(api)(["ok"])))
    client = await serve(provider_settings(api, upstream, monkeypatch, knowledge=str(index)))

    first = await wait_terminal(client, (await create_session(client, "Tell me about the lighthouse lens"))["id"])
    assert sources_of(first) == [{"title": "The old lens", "url": "https://old.example/lens"}]
    await build([str(new)], index, base_url="https://new.example")
    second = await wait_terminal(client, (await create_session(client, "Tell me about the lighthouse lens"))["id"])
    assert sources_of(second) == [{"title": "The new lens", "url": "https://new.example/lens"}]
    assert "an LED array now" in system_text(api, upstream.requests[1])

    # A file that turns bad while serving (here: not an index) is not opened; the last good index serves on.
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an index")
    os.replace(bad, index)
    third = await wait_terminal(client, (await create_session(client, "Tell me about the lighthouse lens"))["id"])
    assert sources_of(third) == sources_of(second)


async def test_a_follow_up_question_finds_its_page_through_the_conversations_earlier_question(
    api: str, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, tmp_path: Path
) -> None:
    index = await build([str(SITE)], tmp_path / "knowledge.sqlite3")
    upstream.script(Reply(events_for(api)(["A FUSE cache."])), Reply(events_for(api)(["S3, MinIO, R2."])))
    client = await serve(provider_settings(api, upstream, monkeypatch, knowledge=str(index)))
    first = await create_session(client, "What is Lanternfs?")
    await wait_terminal(client, first["id"])
    follow_up = await create_session(
        client, "Which backends does it support?", conversation_id=first["conversation_id"]
    )
    stream = await wait_terminal(client, follow_up["id"])
    assert sources_of(stream)[0]["url"] == f"{BASE}/projects/lanternfs"
    assert "Cloudflare R2 and Backblaze B2" in system_text(api, upstream.requests[1])


@pytest.mark.parametrize("budget", [300, 2500])
async def test_the_passages_sent_fit_the_character_budget(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, serve: Any, tmp_path: Path, budget: int
) -> None:
    index = await build([str(SITE)], tmp_path / "knowledge.sqlite3")
    upstream.script(Reply(events_for("openai")(["ok"])))
    settings = provider_settings("openai", upstream, monkeypatch, knowledge=str(index), knowledge_max_chars=budget)
    client = await serve(settings)
    await wait_terminal(client, (await create_session(client, "Tidepool tide predictions on a Raspberry Pi"))["id"])
    system = system_text("openai", upstream.requests[0])
    passages = re.findall(r"<passage [^>]*>\n(.*?)\n</passage>", system, flags=re.DOTALL)
    assert passages
    assert sum(map(len, passages)) <= budget


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHATBOT_KNOWLEDGE": "{tmp}/missing.sqlite3"}, "CHATBOT_KNOWLEDGE '{tmp}/missing.sqlite3' cannot be read"),
        ({"CHATBOT_KNOWLEDGE": "{tmp}/garbage"}, "CHATBOT_KNOWLEDGE '{tmp}/garbage' cannot be read as an index"),
        ({"CHATBOT_KNOWLEDGE": "{tmp}"}, "CHATBOT_KNOWLEDGE '{tmp}' cannot be read as an index: not a file"),
        ({"CHATBOT_KNOWLEDGE_MAX_CHARS": "lots"}, "CHATBOT_KNOWLEDGE_MAX_CHARS must be an integer"),
    ],
)
def test_start_up_fails_naming_the_setting(
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "garbage").write_bytes(b"SQLite format 3\x00 but not really")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert cli.main(["serve", "--port", "0"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


async def test_without_the_setting_answers_have_no_sources(client: Any) -> None:
    created = await create_session(client, "How do I flash the Gullwing firmware?")
    stream = await wait_terminal(client, created["id"])
    assert "sources" not in {e.type for e in stream.events}
    assert (await get_session(client, created["id"]))["sources"] == []
    assert json.loads(stream.events[-1].data)["finish_reason"] == "stop"
