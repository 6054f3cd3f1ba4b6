"""The service on a real Redis Cluster (three masters, three replicas on 127.0.0.1): start-up detection,
sessions spread over the masters, sharded notices, two instances, connections per node, and topology
changes mid-answer (a master SIGKILLed, a failover that loses the tail, a slot migrated).

The HTTP contract, resume by header and query and the random-disconnect test run on the cluster too:
the `store` fixture's `cluster` parameter (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis

from chatbot.events import parse_event_id
from chatbot.providers.demo import demo_answer
from tests.cluster import Cluster, ClusterNode
from tests.conftest import free_port, serve_env
from tests.deploy import Follower, Instance
from tests.helpers import assert_well_formed, text_of
from tests.sse import SSEParser

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

FAST_ENV = {"CHATBOT_DEMO_TOKENS_PER_SECOND": "200", "CHATBOT_DEMO_ANSWER_TOKENS": "40"}
# About 6 s per answer: long enough to break the cluster in the middle of it.
PACED_ENV = {
    "CHATBOT_DEMO_TOKENS_PER_SECOND": "20",
    "CHATBOT_DEMO_ANSWER_TOKENS": "120",
    "CHATBOT_HEARTBEAT_SECONDS": "1",
    "CHATBOT_LEASE_TTL_SECONDS": "3",
}
TERMINAL_WITHIN_S = 15.0


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, emptied; whatever a test broke is brought back afterwards."""
    redis_cluster.flush()
    try:
        yield redis_cluster
    finally:
        redis_cluster.restore()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@pytest_asyncio.fixture
async def instances(cluster: Cluster, tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Instances]:
    group = Instances(cluster, tmp_path, http)
    try:
        yield group
    finally:
        group.stop_all()


class Instances:
    """`python -m chatbot serve` processes pointed at one node of the cluster (they find the rest)."""

    def __init__(self, cluster: Cluster, tmp: Path, http: aiohttp.ClientSession) -> None:
        self.cluster, self.tmp, self.http = cluster, tmp, http
        self.started: list[Instance] = []

    async def start(self, **env: str) -> Instance:
        port = free_port()
        instance = Instance(port, self.tmp / f"serve-{port}.log", serve_env(port, self.cluster.url, **env))
        instance.start()
        self.started.append(instance)
        await instance.wait_ready(self.http)
        return instance

    def stop_all(self) -> None:
        for instance in self.started:
            instance.stop()


async def post(http: aiohttp.ClientSession, instance: Instance, message: str) -> str:
    async with http.post(instance.url + "/sessions", json={"message": message}) as resp:
        assert resp.status == 201, await resp.text()
        session_id: str = (await resp.json())["id"]
        return session_id


async def state(http: aiohttp.ClientSession, instance: Instance, session_id: str) -> dict[str, Any]:
    async with http.get(f"{instance.url}/sessions/{session_id}") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


def expected(message: str, env: dict[str, str]) -> str:
    return "".join(demo_answer(message, int(env["CHATBOT_DEMO_ANSWER_TOKENS"])))


async def tokens_seen(follower: Follower, count: int) -> None:
    while sum(e.type == "token" for e in follower.events) < count:
        follower.progress.clear()
        await asyncio.wait_for(follower.progress.wait(), 10)


def master_of(cluster: Cluster, session_id: str) -> ClusterNode:
    return cluster.owner_of(f"chatbot:{{{session_id}}}:events")


# -- start-up, spread, notices --------------------------------------------------------------------------


async def test_start_up_says_cluster_and_sessions_spread_over_all_masters(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    instance = await instances.start(**FAST_ENV)
    assert "using Redis Cluster" in instance.tail() and "3 masters" in instance.tail(), instance.tail()
    messages = [f"question number {i} about shards" for i in range(24)]
    sids = await asyncio.gather(*(post(http, instance, m) for m in messages))
    followers = [Follower(instance.url, sid) for sid in sids]
    await asyncio.gather(*(f.run(http, deadline_s=30) for f in followers))
    for follower, message in zip(followers, messages, strict=True):
        assert_well_formed(follower.events)
        assert follower.events[-1].type == "done"
        assert text_of(follower.events) == expected(message, FAST_ENV)
        assert (await state(http, instance, follower.session_id))["text"] == text_of(follower.events)
    owners = {master_of(cluster, sid).port for sid in sids}
    assert owners == {node.port for node in cluster.masters()}, "the sessions did not reach every master"


async def test_notices_are_sharded_to_the_owning_master_and_cancel_is_per_session(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    producer = await instances.start(**PACED_ENV)
    reader = await instances.start(**PACED_ENV)
    sid = await post(http, producer, "a question to cancel")
    follower = Follower(reader.url, sid)
    task = asyncio.create_task(follower.run(http, deadline_s=30))
    await tokens_seen(follower, 3)
    owner = master_of(cluster, sid)
    for node in cluster.live_nodes():
        with node.client() as client:
            shard_channels = set(client.execute_command("PUBSUB", "SHARDCHANNELS"))
            classic_channels = set(client.execute_command("PUBSUB", "CHANNELS"))
        assert not classic_channels, f"classic pub/sub channels on {node.port}: {classic_channels}"
        if node.port == owner.port:
            # the reader's instance hears the session grow; the producer's hears its cancel
            assert shard_channels == {f"chatbot:{{{sid}}}:grew", f"chatbot:{{{sid}}}:cancel"}
        else:
            assert not shard_channels, f"{node.port} holds shard channels of a session it does not own"
    async with http.post(f"{reader.url}/sessions/{sid}/cancel") as resp:
        assert resp.status == 202
    await asyncio.wait_for(task, TERMINAL_WITHIN_S)
    assert_well_formed(follower.events)
    assert follower.events[-1].type == "done" and follower.events[-1].json()["finish_reason"] == "cancelled"
    assert (await state(http, producer, sid))["status"] == "cancelled"


# -- two instances -------------------------------------------------------------------------------------


async def test_post_on_one_instance_read_on_the_other_then_sigkill_the_producer(
    instances: Instances, http: aiohttp.ClientSession
) -> None:
    a = await instances.start(**PACED_ENV)
    b = await instances.start(**PACED_ENV)
    message = "read me elsewhere"
    sid = await post(http, a, message)
    whole = Follower(b.url, sid)
    await whole.run(http, deadline_s=30)
    assert_well_formed(whole.events)
    assert text_of(whole.events) == expected(message, PACED_ENV)
    middle = whole.events[len(whole.events) // 2].id or ""
    async with http.get(f"{a.url}/events/{sid}", params={"last_event_id": middle}) as resp:
        rest = SSEParser().feed(await resp.read())
    assert [e.id for e in rest] == [e.id for e in whole.events[len(whole.events) // 2 + 1 :]]

    sid = await post(http, a, "the producer dies")
    follower = Follower(b.url, sid)
    task = asyncio.create_task(follower.run(http, deadline_s=40))
    await tokens_seen(follower, 3)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=5)
    killed = time.monotonic()
    await asyncio.wait_for(task, TERMINAL_WITHIN_S)
    assert time.monotonic() - killed < TERMINAL_WITHIN_S
    assert_well_formed(follower.events)
    terminal = follower.events[-1]
    assert terminal.type == "error" and terminal.json()["retryable"] is True, terminal
    assert (await state(http, b, sid))["status"] == "failed"


# -- connections ---------------------------------------------------------------------------------------


def connections_per_node(cluster: Cluster) -> dict[int, int]:
    counts = {}
    for node in cluster.live_nodes():
        with node.client() as client:
            counts[node.port] = sum(1 for c in client.client_list() if "S" not in c["flags"]) - 1  # not this one
    return counts


async def test_hundreds_of_open_streams_hold_a_bounded_number_of_connections_per_node(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    before = connections_per_node(cluster)
    pool = 3
    instance = await instances.start(**PACED_ENV, CHATBOT_REDIS_POOL_SIZE=str(pool))
    sids = await asyncio.gather(*(post(http, instance, f"open stream {i}") for i in range(100)))
    followers = [Follower(instance.url, sid) for sid in sids for _ in range(3)]
    tasks = [asyncio.create_task(f.run(http, deadline_s=60)) for f in followers]
    try:
        for follower in followers:
            await tokens_seen(follower, 2)
        during = connections_per_node(cluster)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    added = {port: during[port] - before[port] for port in during}
    masters = {node.port for node in cluster.masters()}
    for port, count in added.items():
        # The pool, one sharded pub/sub connection per master, and the one redis-py keeps on each node it
        # may ask for the slot map (CLUSTER SLOTS), replicas included.
        limit = pool + 2 if port in masters else 1
        assert count <= limit, f"node {port} holds {count} connections of one instance (limit {limit}): {added}"
    assert sum(added[port] for port in masters) >= 3, added


# -- topology changes mid-answer -----------------------------------------------------------------------


async def test_sigkill_of_the_master_owning_a_live_session(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    instance = await instances.start(**PACED_ENV)
    message = "survive a failover"
    sid = await post(http, instance, message)
    followers = [Follower(instance.url, sid) for _ in range(2)]
    tasks = [asyncio.create_task(f.run(http, deadline_s=60)) for f in followers]
    owner = master_of(cluster, sid)
    # and one answer on another master, which the failover must not disturb
    bystander_message = "a bystander"
    bystander = ""
    while not bystander or master_of(cluster, bystander).port == owner.port:
        bystander = await post(http, instance, bystander_message)
    calm = Follower(instance.url, bystander)
    tasks.append(asyncio.create_task(calm.run(http, deadline_s=60)))
    await tokens_seen(followers[0], 20)
    owner.server.stop()  # SIGKILL
    killed = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*tasks), TERMINAL_WITHIN_S + 6)
    assert_well_formed(calm.events)
    assert calm.events[-1].type == "done" and text_of(calm.events) == expected(bystander_message, PACED_ENV)
    for follower in followers:
        assert_well_formed(follower.events)
        assert follower.arrivals[-1] - killed < TERMINAL_WITHIN_S + 6  # the answer's rest is about 5 s
        terminal = follower.events[-1]
        if terminal.type == "done":
            assert text_of(follower.events) == expected(message, PACED_ENV)
        else:
            assert terminal.json()["retryable"] is True, terminal
    assert [e.id for e in followers[0].events] == [e.id for e in followers[1].events]
    cluster.wait_healthy()
    assert master_of(cluster, sid).port != owner.port
    assert (await state(http, instance, sid))["text"] == text_of(followers[0].events)
    # new sessions work once the cluster is healthy again, on every master
    after = [f"after the failover {i}" for i in range(12)]
    sids = await asyncio.gather(*(post(http, instance, m) for m in after))
    done = [Follower(instance.url, s) for s in sids]
    await asyncio.gather(*(f.run(http, deadline_s=40) for f in done))
    for follower, m in zip(done, after, strict=True):
        assert text_of(follower.events) == expected(m, PACED_ENV) and follower.events[-1].type == "done"


async def test_a_failover_that_lost_the_tail_ends_the_session_with_a_retryable_error(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    # A lease longer than the failover: otherwise its copy on the replica may lapse first, and the readers'
    # sweep ends the session with producer_lost (as retryable) before the producer's next append notices.
    # An answer long enough that its producer still writes when the master dies, however late the readers are.
    env = {**PACED_ENV, "CHATBOT_LEASE_TTL_SECONDS": "30", "CHATBOT_DEMO_ANSWER_TOKENS": "400"}
    instance = await instances.start(**env)
    sid = await post(http, instance, "lose the tail")
    followers = [Follower(instance.url, sid) for _ in range(2)]
    tasks = [asyncio.create_task(f.run(http, deadline_s=60)) for f in followers]
    await tokens_seen(followers[0], 10)
    owner = master_of(cluster, sid)
    replica = replica_of(cluster, owner)
    # The replica that takes over holds the session so far: what it lacks afterwards is only the tail.
    await asyncio.to_thread(wait_replicated, owner, replica, sid)
    with replica.client() as client:
        # The replica cannot resync once cut off, so what the master acknowledges next is never replicated.
        client.config_set("masterauth", "not-the-password")
    with owner.client() as client:
        client.client_kill_filter(_type="replica")
    kept = await asyncio.to_thread(last_id_once_cut_off, replica, sid)
    # The readers see entries that only the master holds (what they see lags what is written, so counting
    # the tokens they see after the cut proves nothing), and the answer is still being written.
    await seen_after(followers[0], kept, 3)
    with owner.client() as client:
        assert client.hget(f"chatbot:{{{sid}}}:meta", "status") == "streaming", "the answer ended before the failover"
    owner.server.stop()  # SIGKILL: the replica that takes over lacks the last entries
    killed = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), TERMINAL_WITHIN_S)
    finally:
        with replica.client() as client, contextlib.suppress(redis.RedisError):
            client.config_set("masterauth", "")
    for follower in followers:
        assert_well_formed(follower.events)
        assert follower.arrivals[-1] - killed < TERMINAL_WITHIN_S
        terminal = follower.events[-1].json()
        assert follower.events[-1].type == "error" and terminal["retryable"] is True, terminal
        assert terminal["code"] == "store_data_lost", terminal
    final = await state(http, instance, sid)
    assert final["status"] == "failed"
    # the store no longer has the text the readers saw last; they were told so
    assert len(final["text"]) < len(text_of(followers[0].events))


def replica_of(cluster: Cluster, master: ClusterNode) -> ClusterNode:
    """The master's only replica: the node that takes over when the master fails."""
    replicas = [
        node
        for node in cluster.live_nodes()
        if (info := node.replication())["role"] == "slave" and info.get("master_port") == master.port
    ]
    assert len(replicas) == 1, f"{master.port} has replicas {[node.port for node in replicas]}, not one"
    assert int(master.replication()["connected_slaves"]) == 1, master.replication()
    return replicas[0]


REPLICATED_WITHIN_S = 10.0


def wait_replicated(master: ClusterNode, replica: ClusterNode, session_id: str) -> None:
    """Until the replica's link is up, it has caught up with the master, and it holds the session's meta and events."""
    meta, stream = f"chatbot:{{{session_id}}}:meta", f"chatbot:{{{session_id}}}:events"
    deadline = time.monotonic() + REPLICATED_WITHIN_S
    while True:
        offset = int(master.replication()["master_repl_offset"])
        info = replica.replication()
        status, length = replica.read_local(("HGET", meta, "status"), ("XLEN", stream))
        if (
            info.get("master_link_status") == "up"
            and int(info["slave_repl_offset"]) >= offset
            and status is not None
            and int(length) > 0
        ):
            return
        assert time.monotonic() < deadline, f"replica {replica.port} never held session {session_id}: {info}"
        time.sleep(0.05)  # replication has no event to await


def last_id_once_cut_off(replica: ClusterNode, session_id: str) -> str:
    """The id of the last event the replica holds, once its link to its master is down: it gets no more."""
    deadline = time.monotonic() + REPLICATED_WITHIN_S
    while replica.replication().get("master_link_status") != "down":
        assert time.monotonic() < deadline, f"replica {replica.port} is still linked to its master"
        time.sleep(0.05)
    (last,) = replica.read_local(("XREVRANGE", f"chatbot:{{{session_id}}}:events", "+", "-", "COUNT", 1))
    assert last, f"replica {replica.port} holds no event of {session_id}"
    return str(last[0][0])


async def seen_after(follower: Follower, event_id: str, count: int) -> None:
    """Until the follower has seen `count` events after `event_id`."""
    after = parse_event_id(event_id)
    while sum(parse_event_id(e.id) > after for e in follower.events if e.id) < count:
        follower.progress.clear()
        await asyncio.wait_for(follower.progress.wait(), 10)


async def test_slot_migration_of_a_live_session_with_readers_attached(
    instances: Instances, http: aiohttp.ClientSession, cluster: Cluster
) -> None:
    instance = await instances.start(**PACED_ENV)
    message = "move my slot"
    sid = await post(http, instance, message)
    followers = [Follower(instance.url, sid) for _ in range(2)]
    tasks = [asyncio.create_task(f.run(http, deadline_s=60)) for f in followers]
    await tokens_seen(followers[0], 10)
    source = master_of(cluster, sid)
    target = next(n for n in cluster.masters() if n.port != source.port)
    await asyncio.to_thread(migrate_slot, cluster, f"chatbot:{{{sid}}}:events", source, target)
    assert master_of(cluster, sid).port == target.port
    await asyncio.wait_for(asyncio.gather(*tasks), TERMINAL_WITHIN_S)
    for follower in followers:
        assert_well_formed(follower.events)
        assert follower.events[-1].type == "done", follower.events[-1]
        assert text_of(follower.events) == expected(message, PACED_ENV)
    assert (await state(http, instance, sid))["text"] == expected(message, PACED_ENV)


def migrate_slot(cluster: Cluster, key: str, source: ClusterNode, target: ClusterNode) -> None:
    """CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE the keys a few at a time, then SETSLOT NODE everywhere."""
    with cluster.client() as c:
        slot = c.keyslot(key)
    src, dst = source.client(), target.client()
    try:
        source_id, target_id = source.node_id(), target.node_id()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)  # type: ignore[no-untyped-call]
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)  # type: ignore[no-untyped-call]
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):  # type: ignore[no-untyped-call]
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]
            time.sleep(0.2)  # the answer goes on while the slot is half moved
        for node in (target, source, *(m for m in cluster.masters() if m.port not in (source.port, target.port))):
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:
        src.close()
        dst.close()


async def test_the_rate_limit_counts_on_the_cluster(cluster: Cluster) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from chatbot.app import create_app
    from tests.conftest import close_promptly, make_settings

    settings = make_settings("cluster", cluster.url, rate_limit=2, rate_window_seconds=60)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        statuses = [(await client.post("/sessions", json={"message": f"hi {i}"})).status for i in range(3)]
        assert statuses == [201, 201, 429]
    finally:
        await close_promptly(client)


async def test_cluster_mode_forced_on_against_one_redis_stops_the_start_with_a_clear_message(redis_url: str) -> None:
    from chatbot.store import StoreUnavailable, open_store
    from tests.conftest import make_settings

    settings = make_settings("redis", redis_url, redis_cluster="on")
    with pytest.raises(StoreUnavailable, match="Cluster mode is not enabled"):
        await open_store(settings, owner="test")


async def test_cluster_mode_forced_off_does_not_ask_the_server(cluster: Cluster) -> None:
    from chatbot.store import open_store
    from tests.conftest import make_settings

    store = await open_store(make_settings("cluster", cluster.url, redis_cluster="off"), owner="test")
    try:
        assert not store.cluster  # a cluster node, taken for a single Redis because the setting says so
    finally:
        await store.close()
