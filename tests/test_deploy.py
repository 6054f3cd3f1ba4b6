"""Deployment and scale-out, natively: several instances behind the repo's nginx config on one Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import jsonschema
import pytest
import pytest_asyncio
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, RedisServer
from tests.deploy import COMPOSE, NGINX_TEMPLATE, Cluster, Follower, api_command, compose
from tests.helpers import assert_come_back, assert_well_formed, text_of
from tests.oracle import expected_text, stall_writes_repeatedly

pytestmark = pytest.mark.timeout(120)

SLOW = {"CHATBOT_DEMO_TOKENS_PER_SECOND": "40", "CHATBOT_DEMO_ANSWER_TOKENS": "80"}
SLOW_TOKENS = 80


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, with an append-only file, so that it can be restarted or killed."""
    with RedisServer(appendonly=True) as server:
        yield server


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
        yield session


async def start_cluster(
    redis_server: RedisServer, count: int, tmp_path: Path, http: aiohttp.ClientSession, **settings: str
) -> Cluster:
    cluster = Cluster.build(redis_server, count, tmp_path, **settings)
    await cluster.start(http)
    return cluster


async def post(http: aiohttp.ClientSession, base: str, message: str, **headers: str) -> aiohttp.ClientResponse:
    async with http.post(f"{base}/sessions", json={"message": message}, headers=headers) as resp:
        await resp.read()
        return resp


async def create(http: aiohttp.ClientSession, base: str, message: str) -> str:
    async with http.post(f"{base}/sessions", json={"message": message}) as resp:
        assert resp.status == 201, await resp.text()
        session_id: str = (await resp.json())["id"]
        return session_id


async def session_state(http: aiohttp.ClientSession, base: str, session_id: str) -> dict[str, str]:
    async with http.get(f"{base}/sessions/{session_id}") as resp:
        assert resp.status == 200
        state: dict[str, str] = await resp.json()
        return state


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- the compose file ----------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_runs_what_the_tests_run() -> None:
    services = compose()["services"]
    assert services["api"]["command"] == ["chatbot", "serve"]
    assert api_command()[1:] == ["serve"] and api_command()[0].endswith("chatbot")
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    mounts = [volume.split(":")[0] for volume in services["nginx"]["volumes"]]
    assert f"./{NGINX_TEMPLATE.relative_to(ROOT)}" in mounts
    for mount in mounts:
        assert (COMPOSE.parent / mount).exists(), mount
    assert services["nginx"]["ports"] == ["8080:8080"]


def test_nginx_config_has_what_sse_needs() -> None:
    text = NGINX_TEMPLATE.read_text()
    events = text[text.index("location /events/") :]
    events = events[: events.index("}")]
    for directive in ("proxy_buffering off;", "gzip off;", "proxy_read_timeout 1h;"):
        assert directive in events, directive
    assert "proxy_http_version 1.1;" in text
    gzip_types = next(line for line in text.splitlines() if line.strip().startswith("gzip_types"))
    assert "text/event-stream" not in gzip_types


# --- through nginx ---------------------------------------------------------------------------------


async def test_sessions_through_nginx_spread_over_instances_and_read_whole(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(own_redis, 3, tmp_path, http, **SLOW)
    try:
        base = cluster.nginx.url
        messages = [f"spread {i}" for i in range(9)]
        ids = [await create(http, base, message) for message in messages]
        followers = [Follower(base, sid) for sid in ids]
        stalls = stall_writes_repeatedly(own_redis.url, pulses=3)  # deltas pile up behind held appends
        await asyncio.gather(stalls, *(f.run(http) for f in followers))
        for follower, message in zip(followers, messages, strict=True):
            assert_well_formed(follower.events)
            assert follower.events[-1].type == "done"
            assert text_of(follower.events) == expected_text(message, SLOW_TOKENS)
            state = await session_state(http, base, follower.session_id)
            assert (state["status"], state["text"]) == ("done", text_of(follower.events))
            # Through nginx the answer arrives as it is written, not in one piece at the end.
            assert follower.arrivals[-1] - follower.arrivals[0] > 1.0
        # An outcome is counted just after its terminal event is written: wait for the last ones.
        deadline = time.monotonic() + 5
        while sum(produced := [await metric(http, i.url, "chatbot_sessions_total") for i in cluster.instances]) < 9:
            assert time.monotonic() < deadline, produced
            await asyncio.sleep(0.05)
        served = [await metric(http, i.url, "chatbot_events_sent_total") for i in cluster.instances]
        assert sum(produced) == 9
        assert sum(1 for n in produced if n) >= 2, f"sessions were produced on one instance only: {produced}"
        assert sum(1 for n in served if n) >= 2, f"streams were served by one instance only: {served}"
    finally:
        cluster.stop()


async def test_rolling_restart_loses_no_token(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(own_redis, 3, tmp_path, http, CHATBOT_SHUTDOWN_GRACE_SECONDS="20", **SLOW)
    try:
        base = cluster.nginx.url
        followers: list[Follower] = []
        messages: dict[str, str] = {}
        readers: list[asyncio.Task[None]] = []

        async def start_answers(count: int) -> None:
            for i in range(count):
                message = f"rolling {len(followers)} {i}"
                follower = Follower(base, await create(http, base, message))
                messages[follower.session_id] = message
                followers.append(follower)
                readers.append(asyncio.create_task(follower.run(http, deadline_s=90)))

        await start_answers(6)
        # Slow appends while the answers run, so that each writer has several deltas to join at once.
        stalls = asyncio.create_task(stall_writes_repeatedly(own_redis.url, pulses=4))
        for n, instance in enumerate(cluster.instances):
            await asyncio.sleep(0.5)
            # A reader on this instance of an answer the next instance produces, begun last: it outlives this
            # instance's own answers, so the drain ends its stream, and it resumes through nginx on another
            # instance. Through nginx alone, whether any reader is moved depends on timing.
            producer = cluster.instances[(n + 1) % len(cluster.instances)]
            message = f"rolling pinned {n}"
            pinned = Follower(instance.url, await create(http, producer.url, message))
            messages[pinned.session_id] = message
            followers.append(pinned)
            readers.append(asyncio.create_task(pinned.run(http, deadline_s=90)))
            await asyncio.wait_for(pinned.wait_events(1), 10)  # attached before this instance stops accepting
            pinned.base = base  # its reconnects go through nginx, as a browser's would
            instance.signal(signal.SIGTERM)
            await start_answers(2)  # new sessions keep coming while this one drains
            assert await asyncio.to_thread(instance.wait_exit, 40) == 0, instance.log.read_text()[-2000:]
            instance.start()
            await instance.wait_ready(http)
        await asyncio.gather(*readers, stalls)
        reconnected = 0
        for follower in followers:
            assert_well_formed(follower.events)
            state = await session_state(http, base, follower.session_id)
            assert follower.events[-1].type == "done", (follower.events[-1], state)
            assert text_of(follower.events) == expected_text(messages[follower.session_id], SLOW_TOKENS)
            assert (state["status"], state["text"]) == ("done", text_of(follower.events))
            reconnected += follower.connections > 1
        assert reconnected, "no reader was moved by the restarts: the test did not test resuming"
    finally:
        cluster.stop()


async def test_sigkill_of_the_producer_ends_readers_within_10s(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(
        own_redis, 2, tmp_path, http, CHATBOT_DEMO_TOKENS_PER_SECOND="5", CHATBOT_DEMO_ANSWER_TOKENS="300"
    )
    try:
        base = cluster.nginx.url
        session_id = await create(http, base, "who makes this")
        follower = Follower(base, session_id)
        reader = asyncio.create_task(follower.run(http))
        await asyncio.wait_for(follower.wait_events(2), 10)
        with own_redis.client() as client:
            owner = client.get(f"chatbot:{{{session_id}}}:lease")
        assert owner, "the producer holds no lease"
        pid = int(str(owner).split(":")[1])
        producer = next(i for i in cluster.instances if i.proc is not None and i.proc.pid == pid)
        producer.signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(reader, 15)
        last = follower.events[-1]
        assert last.type == "error" and json.loads(last.data)["retryable"] is True, last
        assert follower.arrivals[-1] - killed < 10
        state = await session_state(http, base, session_id)
        assert (state["status"], state["text"]) == ("failed", text_of(follower.events))
    finally:
        cluster.stop()


async def test_redis_restart_mid_answer_resumes(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Redis is down for well under OUTAGE_SECONDS and the leases' TTL: every answer must end whole.

    The producers hold the text that failed to append and send it again once Redis is back; the append-only
    file keeps the stream, the meta hash and the lease. An `error` would only be right for an outage longer
    than the lease (producer_lost) or than the producer's patience (then the answer is abandoned); this
    restart takes well under a second, so any error here is a defect.
    """
    cluster = await start_cluster(own_redis, 2, tmp_path, http, **SLOW)
    try:
        base = cluster.nginx.url
        messages = [f"restart {i}" for i in range(4)]
        followers = [Follower(base, await create(http, base, message)) for message in messages]
        readers = [asyncio.create_task(f.run(http)) for f in followers]
        await asyncio.wait_for(asyncio.gather(*(f.wait_events(3) for f in followers)), 10)
        down = time.monotonic()
        # SHUTDOWN writes the append-only file, so the data survives. Down for 1.5 s: longer than redis-py's
        # own reconnect retries, so that appends really fail and producers must send their text again.
        await asyncio.to_thread(own_redis.restart, 1.5)
        back = time.monotonic()
        assert back - down < 3, f"the restart took {back - down:.1f} s: longer than this test is about"
        await asyncio.gather(*readers)
        for follower, message in zip(followers, messages, strict=True):
            assert_well_formed(follower.events)
            assert follower.events[-1].type == "done", follower.events[-1]
            assert follower.events[-1].json()["finish_reason"] == "stop"
            assert text_of(follower.events) == expected_text(message, SLOW_TOKENS), "text lost across the restart"
            after = [t for t in follower.arrivals if t > back]
            assert after and after[0] - back < 5, "a reader stayed silent for 5 s after Redis came back"
            state = await session_state(http, base, follower.session_id)
            assert (state["status"], state["text"]) == ("done", text_of(follower.events))
    finally:
        cluster.stop()


async def test_redis_restart_without_its_data_ends_readers_explicitly(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    with RedisServer() as server:
        cluster = await start_cluster(server, 1, tmp_path, http, **SLOW)
        try:
            base = cluster.nginx.url
            follower = Follower(base, await create(http, base, "forgotten"))
            reader = asyncio.create_task(follower.run(http, deadline_s=20))
            await asyncio.sleep(0.6)
            server.restart()
            back = time.monotonic()
            # The session is gone with the data: the stream is ended and its reconnect is answered 404.
            with pytest.raises(AssertionError, match="404"):
                await reader
            assert time.monotonic() - back < 5
        finally:
            cluster.stop()


# --- limits ------------------------------------------------------------------------------------------


async def test_rate_limit_is_shared_across_instances_and_keyed_by_forwarded_client(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(
        own_redis, 2, tmp_path, http, CHATBOT_RATE_LIMIT="4", CHATBOT_RATE_WINDOW_SECONDS="60"
    )
    try:
        base = cluster.nginx.url
        client_a = {"X-Forwarded-For": "203.0.113.5"}
        answers = [await post(http, base, f"a{i}", **client_a) for i in range(4)]
        assert [r.status for r in answers] == [201] * 4
        refused = await post(http, base, "a5", **client_a)
        assert refused.status == 429
        assert refused.headers["Content-Type"].startswith("application/problem+json")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another client behind the same proxy has its own budget.
        assert (await post(http, base, "b1", **{"X-Forwarded-For": "198.51.100.7"})).status == 201
        # Counted in Redis, not per instance: each instance answers 429 for client A.
        for instance in cluster.instances:
            direct = await post(http, instance.url, "direct", **{"X-Forwarded-For": "203.0.113.5"})
            assert direct.status == 429
        counted = [
            await metric(http, i.url, "chatbot_rejected_requests_total", limit="rate") for i in cluster.instances
        ]
        assert sum(counted) == 3
    finally:
        cluster.stop()


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(
        own_redis, 1, tmp_path, http, CHATBOT_RATE_LIMIT="2", CHATBOT_TRUSTED_PROXIES="10.0.0.0/8"
    )
    try:
        url = cluster.instances[0].url
        statuses = [(await post(http, url, f"m{i}", **{"X-Forwarded-For": f"192.0.2.{i}"})).status for i in range(3)]
        assert statuses == [201, 201, 429], "a client escaped the limit by forging X-Forwarded-For"
    finally:
        cluster.stop()


async def test_stream_caps_answer_retry_per_client_and_per_instance(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(
        own_redis, 1, tmp_path, http,
        CHATBOT_MAX_STREAMS_PER_ADDRESS="2", CHATBOT_MAX_STREAMS="3", CHATBOT_RATE_LIMIT="0",
        CHATBOT_DEMO_TOKENS_PER_SECOND="2", CHATBOT_DEMO_ANSWER_TOKENS="100",
    )  # fmt: skip
    try:
        base = cluster.nginx.url
        session_id = await create(http, base, "caps")
        url = f"{base}/events/{session_id}"
        first = await http.get(url, headers={"X-Forwarded-For": "203.0.113.1"})
        second = await http.get(url, headers={"X-Forwarded-For": "203.0.113.1"})
        assert (first.status, second.status) == (200, 200)
        # A cap passes as streams close: 200 with only retry:, so that an EventSource comes back.
        async with http.get(url, headers={"X-Forwarded-For": "203.0.113.1"}) as third:
            await assert_come_back(third, "streams_per_address", 5.0)
        other = await http.get(url, headers={"X-Forwarded-For": "203.0.113.2"})
        assert other.status == 200
        async with http.get(cluster.instances[0].url + f"/events/{session_id}") as full:
            await assert_come_back(full, "streams_per_instance", 1.0)
        assert await metric(http, cluster.instances[0].url, "chatbot_open_streams") == 3
        for response in (first, second, other):
            response.close()
        # Closing a stream frees its place.
        deadline = time.monotonic() + 5
        while await metric(http, cluster.instances[0].url, "chatbot_open_streams") != 0:
            assert time.monotonic() < deadline, "closed streams still count"
            await asyncio.sleep(0.05)
        async with http.get(url, headers={"X-Forwarded-For": "203.0.113.1"}) as again:
            assert again.status == 200
    finally:
        cluster.stop()


async def test_nginx_answers_retry_on_events_when_no_instance_answers(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(own_redis, 1, tmp_path, http)
    try:
        base = cluster.nginx.url
        session_id = await create(http, base, "nginx retry")
        async with http.get(f"{base}/events/{session_id}") as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
            await resp.read()
        cluster.instances[0].stop()
        retries = set()
        for _ in range(4):
            async with http.get(f"{base}/events/{session_id}", headers={"Last-Event-ID": "1-0"}) as down:
                retries.add(await assert_come_back(down, "upstream_unavailable", 1.0, jitter=1.0))
            await asyncio.sleep(0.003)
        assert len(retries) > 1, "no jitter"
        # Only nginx's own failures become retry:; elsewhere a 502 stays a 502.
        async with http.get(f"{base}/sessions/{session_id}") as other:
            assert other.status == 502
        cluster.instances[0].start()
        await cluster.instances[0].wait_ready(http)
        # The instances' final answers pass through nginx unchanged.
        async with http.get(f"{base}/events/{session_id}x") as unknown:
            assert unknown.status == 404 and unknown.headers["Cache-Control"] == "no-store"
    finally:
        cluster.stop()


# --- metrics and logs ---------------------------------------------------------------------------------


async def test_metrics_parse_and_move(own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    cluster = await start_cluster(
        own_redis, 1, tmp_path, http,
        CHATBOT_LOG_FORMAT="json", CHATBOT_DEMO_TOKENS_PER_SECOND="100", CHATBOT_DEMO_ANSWER_TOKENS="50",
    )  # fmt: skip
    try:
        url = cluster.instances[0].url
        async with http.get(url + "/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            names = {family.name for family in text_string_to_metric_families(await resp.text())}
        assert {
            "chatbot_open_streams", "chatbot_sessions", "chatbot_tokens_relayed", "chatbot_time_to_first_token_seconds",
            "chatbot_upstream_errors", "chatbot_redis_errors", "chatbot_events_sent",
        } <= names  # fmt: skip
        before = await metric(http, url, "chatbot_tokens_relayed_total")
        follower = Follower(url, await create(http, url, "count me"))
        await follower.run(http)
        # Every delta the provider produced, however the writer coalesced them into events.
        assert await metric(http, url, "chatbot_tokens_relayed_total") - before == 50
        deadline = time.monotonic() + 5
        while await metric(http, url, "chatbot_sessions_total", outcome="stop") != 1:
            assert time.monotonic() < deadline, "the session's outcome was never counted"
            await asyncio.sleep(0.05)
        assert await metric(http, url, "chatbot_time_to_first_token_seconds_count") == 1
        assert await metric(http, url, "chatbot_events_sent_total") == len(follower.events)
        # One JSON log line per session outcome, naming the session.
        lines = [json.loads(line) for line in cluster.instances[0].log.read_text().splitlines() if line.startswith("{")]
        outcomes = [line for line in lines if line.get("outcome")]
        assert [(o["session_id"], o["outcome"]) for o in outcomes] == [(follower.session_id, "stop")]
    finally:
        cluster.stop()


def test_redis_fixture_restart_keeps_data(own_redis: RedisServer) -> None:
    """The restart helper the tests above rely on really restarts Redis and keeps the append-only data."""
    with own_redis.client() as client:
        client.set("kept", "yes")
        before = client.info("server")["run_id"]
    own_redis.restart()
    with redis.Redis(host="127.0.0.1", port=own_redis.port, decode_responses=True) as client:
        assert client.get("kept") == "yes"
        assert client.info("server")["run_id"] != before


async def test_nginx_serves_the_widget_with_its_headers(
    own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await start_cluster(own_redis, 1, tmp_path, http)
    try:
        async with http.get(cluster.nginx.url + "/") as page:
            assert page.status == 200 and "widget.js" in await page.text()
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        async with http.get(cluster.nginx.url + "/widget.js", headers={"Accept-Encoding": "gzip"}) as script:
            assert script.status == 200 and "javascript" in script.headers["Content-Type"]
            assert script.headers.get("Content-Encoding") == "gzip"  # ordinary responses are compressed
            assert len(await script.read()) > 1000
    finally:
        cluster.stop()
