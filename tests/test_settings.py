"""Settings are read once from the environment; a bad value fails at start naming its variable."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from chatbot.settings import Settings, SettingsError
from tests.conftest import ROOT, free_port
from tests.helpers import text_of
from tests.oracle import expected_text
from tests.sse import SSEParser


def test_defaults_from_empty_environment() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.provider) == ("127.0.0.1", 8080, "demo")
    assert settings.redis_url is None and settings.embedded_store
    assert (settings.demo_tokens_per_second, settings.demo_answer_tokens) == (20.0, 120)
    assert settings.session_ttl_seconds == 3600


def test_values_from_environment() -> None:
    settings = Settings.from_env(
        {
            "CHATBOT_HOST": "0.0.0.0",
            "CHATBOT_PORT": "9000",
            "CHATBOT_REDIS_URL": "redis://localhost:6380/2",
            "CHATBOT_DEMO_TOKENS_PER_SECOND": "50.5",
            "CHATBOT_SESSION_TTL_SECONDS": "60",
            "CHATBOT_CORS_ORIGINS": "https://a.example, https://b.example/",
            "CHATBOT_WRITE_BATCH_INTERVAL_MS": "0.5",
            "CHATBOT_STARTS_AT_ONCE": "3",
        }
    )
    assert settings.write_batch_interval_ms == 0.5 and Settings().write_batch_interval_ms == 2.0
    assert settings.starts_at_once == 3 and Settings().starts_at_once == 8
    assert settings.host == "0.0.0.0" and settings.port == 9000
    assert settings.redis_url == "redis://localhost:6380/2" and not settings.embedded_store
    assert settings.demo_tokens_per_second == 50.5 and settings.session_ttl_seconds == 60
    assert settings.cors_origins == ("https://a.example", "https://b.example")


def test_redis_cluster_mode_defaults_to_auto() -> None:
    assert Settings.from_env({}).redis_cluster == "auto"
    assert Settings.from_env({"CHATBOT_REDIS_CLUSTER": "on"}).redis_cluster == "on"


def test_empty_redis_url_means_embedded() -> None:
    assert Settings.from_env({"CHATBOT_REDIS_URL": ""}).embedded_store


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATBOT_PORT", "eighty"),
        ("CHATBOT_PORT", "70000"),
        ("CHATBOT_REDIS_URL", "localhost:6379"),
        ("CHATBOT_PROVIDER", "gpt"),
        ("CHATBOT_DEMO_TOKENS_PER_SECOND", "0"),
        ("CHATBOT_DEMO_TOKENS_PER_SECOND", "nan"),
        ("CHATBOT_DEMO_ANSWER_TOKENS", "-3"),
        ("CHATBOT_SESSION_TTL_SECONDS", "1.5"),
        ("CHATBOT_CORS_ORIGINS", "example.com"),
        ("CHATBOT_REDIS_CLUSTER", "yes"),
        ("CHATBOT_REASONING", "maybe"),
        ("CHATBOT_ANSWER_DEADLINE_SECONDS", "0"),
        ("CHATBOT_EVENT_LOOP", "trio"),
        ("CHATBOT_WRITE_BATCH_INTERVAL_MS", "-1"),
        ("CHATBOT_WRITE_BATCH_INTERVAL_MS", "nan"),
        ("CHATBOT_WRITE_BATCH_INTERVAL_MS", "5000"),
        ("CHATBOT_STARTS_AT_ONCE", "0"),
        ("CHATBOT_STARTS_AT_ONCE", "eight"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_serve_refuses_to_start_on_a_bad_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatbot", "serve"],
        env={"CHATBOT_PORT": "eighty", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "CHATBOT_PORT" in result.stderr and "'eighty'" in result.stderr


def test_reasoning_and_answer_deadline_are_read() -> None:
    settings = Settings.from_env({"CHATBOT_REASONING": "hide", "CHATBOT_ANSWER_DEADLINE_SECONDS": "90"})
    assert (settings.reasoning, settings.answer_deadline_seconds) == ("hide", 90.0)
    assert (Settings().reasoning, Settings().answer_deadline_seconds) == ("show", 600.0)


@pytest.mark.parametrize(("choice", "loop"), [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_serve_runs_on_the_event_loop_it_names_and_answers_on_it(choice: str | None, loop: str) -> None:
    """`chatbot serve` says its loop at start-up (uvloop by default here) and streams a whole answer on it."""
    port = free_port()
    env = {**os.environ, "CHATBOT_PORT": str(port), "CHATBOT_PROVIDER": "demo", "CHATBOT_REDIS_URL": ""}
    env["CHATBOT_DEMO_TOKENS_PER_SECOND"] = "500"
    env.pop("CHATBOT_EVENT_LOOP", None)
    if choice is not None:
        env["CHATBOT_EVENT_LOOP"] = choice
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatbot", "serve"], env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"event loop {loop})" in line, line
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            for _ in range(100):
                try:
                    created = http.post("/sessions", json={"message": "which loop?"})
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)  # the port opens just after the log line
            assert created.status_code == 201
            events = SSEParser().feed(http.get(created.json()["events_url"]).content)
        assert events[-1].type == "done", events[-1]
        assert text_of(events) == expected_text("which loop?", Settings().demo_answer_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stderr is not None:
            proc.stderr.close()
