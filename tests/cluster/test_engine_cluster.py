"""The engine on a real Redis Cluster: client, server, maintenance, inspector and pub/sub, with
each test's queues spread over all three nodes and raw keys asserted where they live.

Background loops get long intervals and a ManualClock where timing matters, so the tests drive
them (``beat()``, ``run_once()``) instead of waiting for timers, as tests/engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.broker import LEASE_DURATION_S, Leased
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.connection import RedisSettings, create_client, open_pubsub
from aqsh.engine.fastlane import FastLane
from aqsh.engine.inspect import Inspector
from aqsh.engine.maintenance import LEASE_EXPIRED_ERROR
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker, guarded
from aqsh.engine.scheduler import PeriodicTask, Scheduler
from aqsh.engine.server import Server
from aqsh.engine.task import CancelReason, SkipRetry, Task, TaskContext
from aqsh.redis_process import RedisClusterProcess
from tests.cluster.conftest import PASSWORD, queue_on_node
from tests.support import wait_until

ServerFactory = Callable[..., Server]


@pytest.fixture
async def make_server(
    cluster: RedisCluster, clock: ManualClock, queues: list[str]
) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    def factory(handler: Any, **options: Any) -> Server:
        options.setdefault("queues", dict.fromkeys(queues, 1))
        options.setdefault("heartbeat_interval_s", 3600)
        options.setdefault("forward_interval_s", 3600)
        options.setdefault("recover_interval_s", 3600)
        options.setdefault("janitor_interval_s", 3600)
        options.setdefault("clock", clock)
        server = Server(RedisBroker(cluster), handler, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(shutdown_timeout_s=0)


async def node_port(cluster: RedisCluster, key: str) -> int:
    return int(cluster.get_node_from_key(key).port)


async def subscribers(cluster: RedisCluster, channel: str, expected: int | None = None) -> bool:
    """Whether the channel has subscribers (``expected`` of them), counted on every node
    together: PUBSUB NUMSUB only counts a node's own."""
    reply = await cluster.pubsub_numsub(channel, target_nodes=RedisCluster.PRIMARIES)
    count = sum(int(n) for _, n in reply)
    return count > 0 if expected is None else count == expected


async def absent(cluster: RedisCluster, key: str) -> bool:
    return int(await cluster.exists(key)) == 0


async def state_of(cluster: RedisCluster, qname: str, task_id: str) -> str | None:
    raw = await cluster.hget(keys.queue_keys(qname).task(task_id), "state")
    return raw.decode() if raw else None


async def test_queues_under_test_live_on_three_different_nodes(
    cluster: RedisCluster, queues: list[str], redis_cluster: RedisClusterProcess
) -> None:
    ports = {await node_port(cluster, keys.queue_keys(q).pending) for q in queues}
    assert ports == {node.port for node in redis_cluster.nodes}
    # The globals sit in slots of their own, away from at least one of the queues.
    assert len(ports | {await node_port(cluster, keys.ALL_QUEUES)}) == 3
    assert FastLane.from_redis(cluster) is None  # the fast lane is standalone-only


async def test_enqueue_single_batch_unique_and_scheduled_across_nodes(
    cluster: RedisCluster, queues: list[str], clock: ManualClock
) -> None:
    q0, q1, q2 = queues
    client = Client(cluster, clock=clock)
    # First enqueue per queue: SADD asynq:queues, the script and PUBLISH in one batch, split
    # over three nodes; the script cache is empty, so this also exercises the NOSCRIPT reload.
    single = await client.enqueue("t", b"one", queue=q0, retention=60)
    again = await client.enqueue("t", b"two", queue=q0)  # registered: the script alone
    unique = await client.enqueue("t", b"u", queue=q1, unique_ttl=300)
    with pytest.raises(errors.DuplicateTask):
        await client.enqueue("t", b"u", queue=q1, unique_ttl=300)
    later = await client.enqueue("t", b"later", queue=q2, process_in=120)
    with pytest.raises(errors.TaskIdConflict):
        await client.enqueue("t", b"x", queue=q0, task_id=single.id)

    assert await cluster.lrange(keys.queue_keys(q0).pending, 0, -1) == [
        again.id.encode(), single.id.encode()]
    assert await state_of(cluster, q0, single.id) == "pending"
    q1k = keys.queue_keys(q1)
    assert await cluster.get(q1k.unique("t", b"u")) == unique.id.encode()
    assert await cluster.hget(q1k.task(unique.id), "unique_key") == q1k.unique(
        "t", b"u").encode()
    q2k = keys.queue_keys(q2)
    assert await cluster.zscore(q2k.scheduled, later.id) == unix_s(clock) + 120
    assert later.state is TaskState.SCHEDULED
    assert await cluster.smembers(keys.ALL_QUEUES) == {q.encode() for q in queues}

    # A batch over all three nodes, plain tasks batched per queue, mixed with unique and
    # scheduled ones and a duplicate; the script cache is emptied first to force a reload.
    await cluster.script_flush()
    batch = await client.enqueue_many([
        EnqueueRequest(type="b", payload=b"0", queue=q0),
        EnqueueRequest(type="b", payload=b"1", queue=q1),
        EnqueueRequest(type="b", payload=b"2", queue=q2),
        EnqueueRequest(type="b", payload=b"3", queue=q2),
        EnqueueRequest(type="t", payload=b"u", queue=q1, unique_ttl=300),  # duplicate
        EnqueueRequest(type="b", payload=b"s", queue=q0, process_in=30),
        EnqueueRequest(type="b", payload=b"new", queue="fresh"),
    ])
    assert isinstance(batch[4], errors.DuplicateTask)
    infos = [r for r in batch if not isinstance(r, errors.AqshError)]
    assert len(infos) == 6
    for info in infos:
        expected = "scheduled" if info.message.payload == b"s" else "pending"
        assert await state_of(cluster, info.queue, info.id) == expected
    assert await cluster.llen(keys.queue_keys(q2).pending) == 2
    assert b"fresh" in await cluster.smembers(keys.ALL_QUEUES)


async def test_server_processes_every_queue_with_leases_heartbeats_and_acks(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, make_server: ServerFactory
) -> None:
    release = asyncio.Event()
    running: list[str] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        running.append(task.id)
        await release.wait()
        return b"result:" + task.payload

    server = make_server(handler, concurrency=10)
    client = Client(cluster, clock=clock)
    infos = [await client.enqueue("work", q.encode(), queue=q, retention=600) for q in queues]
    infos.append(await client.enqueue("work", b"gone", queue=queues[1]))  # no retention
    await server.start()
    await wait_until(lambda: len(running) == 4, message="all four running")

    # Each running task is active and leased on its own queue's node.
    for info in infos:
        q = keys.queue_keys(info.queue)
        assert await state_of(cluster, info.queue, info.id) == "active"
        assert await cluster.zscore(q.lease, info.id) == unix_s(clock) + LEASE_DURATION_S
    # A heartbeat writes the server and its workers (one slot) and indexes them (two others),
    # and extends every lease in one pipelined round trip across the nodes.
    clock.advance(10)
    await server.heartbeater.beat()
    for info in infos:
        lease = await cluster.zscore(keys.queue_keys(info.queue).lease, info.id)
        assert lease == unix_s(clock) + LEASE_DURATION_S
    statuses = await Inspector(cluster, clock=clock).servers()
    assert [s.info.server_id for s in statuses] == [server.server_id]
    assert sorted(w.task_id for w in statuses[0].workers) == sorted(i.id for i in infos)

    release.set()
    gone = keys.queue_keys(queues[1]).task(infos[3].id)
    await wait_until(lambda: absent(cluster, gone), message="acknowledged")
    for info in infos[:3]:
        q = keys.queue_keys(info.queue)
        await wait_until(lambda q=q, info=info: cluster.zscore(q.completed, info.id),
                         message=f"{info.queue} completed")
        assert await cluster.hget(q.task(info.id), "result") == b"result:" + info.message.payload
        assert await cluster.llen(q.active) == 0
        assert await cluster.zcard(q.lease) == 0
    assert await cluster.get(keys.queue_keys(queues[1]).processed_total) == b"2"


async def test_failures_retry_then_archive_and_the_forwarder_brings_them_back(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, make_server: ServerFactory
) -> None:
    attempts: list[tuple[str, int]] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        attempts.append((task.queue, task.retried))
        if task.payload == b"skip":
            raise SkipRetry("hopeless")
        raise RuntimeError("boom")

    server = make_server(handler, retry_delay=lambda n, exc, task: 5.0)
    client = Client(cluster, clock=clock)
    failing = [await client.enqueue("f", b"x", queue=q, max_retry=1) for q in queues]
    skipped = await client.enqueue("f", b"skip", queue=queues[2], max_retry=5)
    await server.start()
    for info in failing:
        retry = keys.queue_keys(info.queue).retry
        await wait_until(lambda retry=retry, info=info: cluster.zscore(retry, info.id),
                         message=f"{info.queue} in retry")
        assert await cluster.zscore(retry, info.id) == unix_s(clock) + 5
    q2 = keys.queue_keys(queues[2])
    await wait_until(lambda: cluster.zscore(q2.archived, skipped.id), message="skip archived")

    clock.advance(6)
    assert await server.forwarder.run_once() == 3  # one due task per node
    for info in failing:
        archived = keys.queue_keys(info.queue).archived
        await wait_until(lambda archived=archived, info=info: cluster.zscore(archived, info.id),
                         message=f"{info.queue} archived after its last retry")
        stored = wire.decode_task(await cluster.hget(keys.queue_keys(info.queue).task(info.id),
                                                     "msg"))
        assert (stored.retried, stored.error_msg) == (1, "RuntimeError: boom")
        q = keys.queue_keys(info.queue)
        failures = 3 if info.queue == queues[2] else 2  # queues[2] also had the skipped one
        assert await cluster.get(q.failed_total) == str(failures).encode()
    assert sorted(attempts) == sorted(
        [(q, 0) for q in queues] + [(q, 1) for q in queues] + [(queues[2], 0)])


async def test_recoverer_retries_or_archives_tasks_of_a_dead_worker(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, make_server: ServerFactory
) -> None:
    client = Client(cluster, clock=clock)
    broker = RedisBroker(cluster)
    retried = await client.enqueue("r", b"", queue=queues[0], max_retry=3)
    archived = await client.enqueue("r", b"", queue=queues[1], max_retry=0)
    # A worker took them long ago and died: leases ran out more than the 30 s skew ago.
    long_ago = unix_s(clock) - 100
    leased = await broker.dequeue_many(queues, limit=10, now_s=long_ago)
    assert {lease.message.id for lease in leased} == {retried.id, archived.id}

    server = make_server(lambda task, ctx: asyncio.sleep(0),
                         retry_delay=lambda n, exc, task: 60.0)
    assert await server.recoverer.run_once() == 2
    q0, q1 = keys.queue_keys(queues[0]), keys.queue_keys(queues[1])
    assert await cluster.zscore(q0.retry, retried.id) == unix_s(clock) + 60
    assert await cluster.zscore(q1.archived, archived.id) == unix_s(clock)
    stored = wire.decode_task(await cluster.hget(q1.task(archived.id), "msg"))
    assert stored.error_msg == LEASE_EXPIRED_ERROR
    for q in (q0, q1):
        assert await cluster.llen(q.active) == 0
        assert await cluster.zcard(q.lease) == 0


async def test_janitor_deletes_expired_completed_tasks_on_every_node(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, make_server: ServerFactory
) -> None:
    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return None

    server = make_server(handler)
    client = Client(cluster, clock=clock)
    infos = [await client.enqueue("j", b"", queue=q, retention=10) for q in queues]
    await server.start()
    for info in infos:
        completed = keys.queue_keys(info.queue).completed
        await wait_until(lambda completed=completed, info=info: cluster.zscore(completed, info.id),
                         message="completed")
    clock.advance(11)
    assert await server.janitor.run_once() == 3
    for info in infos:
        assert await cluster.exists(keys.queue_keys(info.queue).task(info.id)) == 0


async def test_inspector_finds_lists_and_controls_tasks_across_nodes(
    cluster: RedisCluster, queues: list[str], clock: ManualClock
) -> None:
    client = Client(cluster, clock=clock)
    inspector = Inspector(cluster, clock=clock)
    q0, q1, q2 = queues
    pending = await client.enqueue("i", b"p", queue=q0)
    scheduled = await client.enqueue("i", b"s", queue=q1, process_in=60)
    other = await client.enqueue("i", b"o", queue=q2)
    for _ in range(3):
        await client.enqueue("i", b"bulk", queue=q2, process_in=30)

    assert await inspector.queues() == sorted(queues)
    info = await inspector.queue_info(q2)
    assert (info.pending, info.scheduled, info.size) == (1, 3, 4)
    assert info.memory_usage_bytes > 0
    # find_task: one pipeline over every queue, split per node by the client.
    found = await inspector.find_task(scheduled.id)
    assert (found.queue, found.state, found.next_process_at_s) == (
        q1, TaskState.SCHEDULED, unix_s(clock) + 60)
    assert (await inspector.find_task(other.id)).queue == q2
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task("no-such-task")
    listed = await inspector.list_tasks(q2, TaskState.SCHEDULED)
    assert [t.message.payload for t in listed] == [b"bulk"] * 3

    await inspector.run_task(q1, scheduled.id)
    assert await state_of(cluster, q1, scheduled.id) == "pending"
    assert await cluster.lrange(keys.queue_keys(q1).pending, 0, -1) == [scheduled.id.encode()]
    await inspector.archive_task(q0, pending.id)
    assert await cluster.zscore(keys.queue_keys(q0).archived, pending.id) == unix_s(clock)
    await inspector.delete_task(q2, other.id)
    assert await cluster.exists(keys.queue_keys(q2).task(other.id)) == 0
    assert await inspector.run_all(q2, TaskState.SCHEDULED) == 3
    assert await cluster.llen(keys.queue_keys(q2).pending) == 3
    assert await inspector.delete_all(q2, TaskState.PENDING) == 3
    assert (await inspector.queue_info(q2)).size == 0

    await inspector.pause_queue(q1)
    assert (await inspector.queue_info(q1)).paused
    broker = RedisBroker(cluster)
    assert await broker.dequeue_many(queues, limit=10, now_s=unix_s(clock)) == []
    await inspector.unpause_queue(q1)
    leased = await broker.dequeue_many(queues, limit=10, now_s=unix_s(clock))
    assert [lease.message.id for lease in leased] == [scheduled.id]

    await inspector.delete_queue(q2)
    assert q2 not in await inspector.queues()
    stats = await inspector.history(q1, 2)
    assert [s.queue for s in stats] == [q1, q1]


async def test_classic_publish_reaches_subscribers_on_every_node(
    cluster: RedisCluster, queues: list[str], redis_cluster: RedisClusterProcess,
    clock: ManualClock,
) -> None:
    """The premise of open_pubsub: a subscriber on any node hears a PUBLISH sent to any other,
    including the one the enqueue script runs on the queue's node."""
    plain = [aioredis.Redis(port=node.port, password=PASSWORD) for node in redis_cluster.nodes]
    pubsubs = [client.pubsub(ignore_subscribe_messages=True) for client in plain]
    try:
        for pubsub in pubsubs:
            await pubsub.subscribe(keys.WAKE_CHANNEL)
        await wait_until(lambda: subscribers(cluster, keys.WAKE_CHANNEL, 3),
                         message="three subscribers")
        client = Client(cluster, clock=clock)
        for q in queues:  # registers each queue: PUBLISH from the client
            await client.enqueue("w", b"", queue=q)
        for q in queues:  # registered: PUBLISH from inside the script, on the queue's node
            await client.enqueue("w", b"", queue=q)
        for pubsub in pubsubs:
            heard: list[bytes] = []
            while len(heard) < 6:
                message = await pubsub.get_message(timeout=5)
                if message is not None:
                    heard.append(message["data"])
            assert sorted(heard) == sorted(q.encode() for q in queues * 2)
    finally:
        for pubsub in pubsubs:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        for c in plain:
            await c.aclose()


class CountingBroker(RedisBroker):
    """Counts the processor's polls, so a test can wait for it to back off."""

    polls = 0

    async def dequeue_many(self, queues: Sequence[str], *, limit: int,
                           now_s: int) -> list[Leased]:
        self.polls += 1
        return await super().dequeue_many(queues, limit=limit, now_s=now_s)


async def test_wakeup_makes_an_idle_server_start_at_once(
    cluster: RedisCluster, queues: list[str]
) -> None:
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        return None

    client = Client(cluster)
    for q in queues:  # register the queues first, so the wake-up comes from the script
        await client.enqueue("warm", b"", queue=q, process_in=3600)
    broker = CountingBroker(cluster)
    server = Server(broker, handler, queues=dict.fromkeys(queues, 1), poll_interval_s=30.0,
                    heartbeat_interval_s=3600, forward_interval_s=3600,
                    recover_interval_s=3600, janitor_interval_s=3600)
    woken: list[str] = []
    wake = server.processor.wake

    def record(qname: str | None = None) -> None:
        woken.append(qname or "")
        wake(qname)

    server.processor.wake = record  # type: ignore[method-assign]
    await server.start()
    try:
        await wait_until(lambda: subscribers(cluster, keys.WAKE_CHANNEL), message="subscribed")
        # After five empty polls (0.1 + 0.2 + 0.4 + 0.8 s) the next one is 1.6 s away.
        await wait_until(lambda: broker.polls >= 5, interval_s=0.005, message="backed off")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await client.enqueue("quick", b"", queue=queues[2])
        await asyncio.wait_for(started.wait(), 5)
        assert loop.time() - t0 < 1.0  # sooner than the timed poll could have come
        assert woken == [queues[2]]
    finally:
        await server.stop(shutdown_timeout_s=0)


async def test_cancellation_reaches_the_running_task(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, make_server: ServerFactory
) -> None:
    started = asyncio.Event()
    reasons: list[CancelReason | None] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            reasons.append(ctx.cancel_reason)
            raise SkipRetry("canceled") from None
        return None

    server = make_server(handler)
    await server.start()
    info = await Client(cluster, clock=clock).enqueue("slow", b"", queue=queues[1])
    await asyncio.wait_for(started.wait(), 5)
    await wait_until(lambda: subscribers(cluster, keys.CANCEL_CHANNEL), message="subscribed")
    await Inspector(cluster, clock=clock).cancel_processing(info.id)
    archived = keys.queue_keys(queues[1]).archived
    await wait_until(lambda: cluster.zscore(archived, info.id), message="archived on cancel")
    assert reasons == [CancelReason.CANCELED]


async def test_subscriber_moves_on_after_its_connection_drops(
    cluster: RedisCluster, redis_cluster: RedisClusterProcess
) -> None:
    broker = RedisBroker(cluster)
    # The cluster is shared by the whole module: a cancel published by an earlier test may
    # still arrive here, so look for this test's own id among whatever comes.
    seen: list[str] = []

    async def listen() -> None:
        async for task_id in broker.cancellations():
            seen.append(task_id)

    listener = asyncio.create_task(listen())
    try:
        await wait_until(lambda: subscribers(cluster, keys.CANCEL_CHANNEL), message="subscribed")
        for node in redis_cluster.nodes:
            async with aioredis.Redis(port=node.port, password=PASSWORD) as plain:
                await plain.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

        async def delivered() -> bool:
            await broker.publish_cancel("after")  # lost while unsubscribed: keep sending
            return "after" in seen

        await wait_until(delivered, timeout_s=15, interval_s=0.05, message="resubscribed")
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def test_open_pubsub_uses_the_password_and_a_primary(
    cluster: RedisCluster, cluster_settings: RedisSettings, redis_cluster: RedisClusterProcess,
) -> None:
    async with open_pubsub(cluster) as pubsub:
        await pubsub.subscribe("probe")
        assert pubsub.connection is not None
        assert int(pubsub.connection.port) in {node.port for node in redis_cluster.nodes}
        assert await subscribers(cluster, "probe", 1)
    await wait_until(lambda: subscribers(cluster, "probe", 0), message="closed")
    wrong = create_client(RedisSettings(cluster_addrs=cluster_settings.cluster_addrs,
                                        password="wrong"))
    with pytest.raises(errors.BrokerUnavailable):
        await RedisBroker(wrong).ping()
    await wrong.aclose()


async def test_scheduler_fires_records_and_clears_across_nodes(
    cluster: RedisCluster, queues: list[str]
) -> None:
    clock = ManualClock(1_767_225_600.0 + 7)  # 2026-01-01T00:00:07Z
    scheduler = Scheduler(RedisBroker(cluster), clock=clock)
    entry_ids = [
        scheduler.register(PeriodicTask(spec="*/5 * * * *", type="cron", payload=q.encode(),
                                        queue=q))
        for q in queues
    ]
    await scheduler.heartbeat()
    assert len(await cluster.lrange(scheduler.entries_key, 0, -1)) == 3
    clock.advance(300)
    fired = await scheduler.fire_due()
    assert sorted(info.queue for info in fired) == sorted(queues)
    for info in fired:
        assert await state_of(cluster, info.queue, info.id) == "pending"
    history = [keys.scheduler_history_key(entry_id) for entry_id in entry_ids]
    for key in history:
        assert await cluster.zcard(key) == 1
    # Retired histories and, on stop, the entries and every history go in DELs that span
    # several slots: the cluster client splits them per slot.
    scheduler.unregister(entry_ids[0])
    await scheduler.heartbeat()
    assert await cluster.exists(history[0]) == 0
    await scheduler.start()
    await scheduler.stop()
    for key in [scheduler.entries_key, *history]:
        assert await cluster.exists(key) == 0
    assert await cluster.zcard(keys.ALL_SCHEDULERS) == 0


async def test_ping_fails_when_one_primary_is_down() -> None:
    """Health and readiness ping every primary: with one down, a third of the queues is out
    of reach even though the other nodes still answer. A cluster of its own, as it is broken."""
    with RedisClusterProcess(3, password=PASSWORD) as doomed:
        client = create_client(RedisSettings(cluster_addrs=doomed.addrs, password=PASSWORD))
        try:
            broker = RedisBroker(client)
            await broker.ping()
            # Not the node a plain PING goes to, which would fail without pinging them all.
            default_port = int(client.get_default_node().port)
            victim = next(i for i, n in enumerate(doomed.nodes) if n.port != default_port)
            live = queue_on_node(doomed, (victim + 1) % 3)
            client_ = Client(broker)
            await client_.enqueue("x", b"", queue=live)  # registered in asynq:queues
            doomed.nodes[victim].kill()
            with pytest.raises(errors.BrokerUnavailable):
                await broker.ping()
            # The surviving nodes keep serving their own queues meanwhile.
            info = await client_.enqueue("x", b"", queue=live)
            assert await state_of(client, live, info.id) == "pending"
        finally:
            await client.aclose()


async def test_a_node_pool_at_its_limit_answers_unavailable_instead_of_queueing(
    cluster_settings: RedisSettings,
) -> None:
    """redis-py's cluster pools have no blocking mode: the caller beyond the limit fails at
    once (the API answers 503) rather than waiting for a connection as on a single Redis."""
    small = create_client(msgspec.structs.replace(cluster_settings, max_connections=2))
    try:
        await small.ping()
        replies = await asyncio.gather(
            *[guarded(small.xread({"logs:pool-probe": "$"}, block=200)) for _ in range(3)],
            return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        assert len(failures) == 1
        assert isinstance(failures[0], errors.BrokerUnavailable)
        assert "MaxConnectionsError" in str(failures[0])
    finally:
        await small.aclose()
