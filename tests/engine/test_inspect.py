"""Inspector against raw asynq keys written the way Go writes them (through our Client/scripts)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import ServerInfo, TaskState, WorkerInfo
from aqsh.engine.rdb import RedisBroker

Q = keys.queue_keys("default")


@pytest.fixture
def client(redis: aioredis.Redis, clock: ManualClock) -> Client:
    return Client(redis, clock=clock)


@pytest.fixture
def inspector(redis: aioredis.Redis, clock: ManualClock) -> Inspector:
    return Inspector(redis, clock=clock)


async def test_queue_info_counts_latency_and_memory(
    redis: aioredis.Redis, client: Client, inspector: Inspector, clock: ManualClock
) -> None:
    await client.enqueue("a", b"1")
    clock.advance(2)
    await client.enqueue("a", b"2")
    await client.enqueue("a", b"3", process_in=60)
    await client.enqueue("a", b"4", queue="other")
    await redis.lpush(Q.pending, "ghost-without-hash")  # must not break memory sampling
    clock.advance(3)
    info = await inspector.queue_info("default")
    assert (info.pending, info.scheduled, info.active, info.size) == (3, 1, 0, 4)
    assert info.latency_s == pytest.approx(5.0)  # oldest pending entered 5 s ago
    assert info.memory_usage_bytes > 0
    assert not info.paused
    await inspector.pause_queue("default")
    assert (await inspector.queue_info("default")).paused
    with pytest.raises(errors.QueueAlreadyPaused):
        await inspector.pause_queue("default")
    await inspector.unpause_queue("default")
    with pytest.raises(errors.QueueNotFound):
        await inspector.queue_info("nope")
    assert await inspector.queues() == ["default", "other"]


async def test_history_reads_daily_counters(
    redis: aioredis.Redis, inspector: Inspector, client: Client, clock: ManualClock
) -> None:
    await client.enqueue("a", b"")
    now = unix_s(clock)
    await redis.set(Q.processed_day(now), 7)
    await redis.set(Q.failed_day(now - 86400), 2)
    stats = await inspector.history("default", 3)
    assert [(s.processed, s.failed) for s in stats] == [(7, 0), (0, 2), (0, 0)]
    assert stats[0].date == keys.day_suffix(now)


async def test_list_tasks_paginates_oldest_first(client: Client, inspector: Inspector) -> None:
    ids = [(await client.enqueue("a", str(i).encode())).id for i in range(5)]
    page1 = await inspector.list_tasks("default", TaskState.PENDING, page=1, page_size=2)
    page3 = await inspector.list_tasks("default", TaskState.PENDING, page=3, page_size=2)
    assert [t.id for t in page1] == ids[:2]
    assert [t.id for t in page3] == ids[4:]
    assert await inspector.list_tasks("default", TaskState.PENDING, page=4, page_size=2) == []


async def test_list_scheduled_and_active_orphans(
    redis: aioredis.Redis, client: Client, inspector: Inspector, clock: ManualClock
) -> None:
    at = datetime.fromtimestamp(unix_s(clock) + 100, UTC)
    sched = await client.enqueue("a", b"s", process_at=at)
    listed = await inspector.list_tasks("default", TaskState.SCHEDULED)
    assert [(t.id, t.next_process_at_s) for t in listed] == [(sched.id, unix_s(clock) + 100)]
    await client.enqueue("a", b"x")
    broker = RedisBroker(redis)
    leased = await broker.dequeue(["default"], now_s=unix_s(clock))
    assert leased is not None
    active = await inspector.list_tasks("default", TaskState.ACTIVE)
    assert [t.is_orphaned for t in active] == [False]
    clock.advance(31)
    assert [t.is_orphaned for t in await inspector.list_tasks("default", TaskState.ACTIVE)] == [
        True]


async def test_find_task_by_id_across_queues_with_result(
    redis: aioredis.Redis, client: Client, inspector: Inspector
) -> None:
    info = await client.enqueue("a", b"p", queue="other", retention=60)
    await redis.hset(keys.queue_keys("other").task(info.id), "result", b"done!")
    found = await inspector.find_task(info.id)
    assert (found.queue, found.state, found.result, found.message.payload) == (
        "other", TaskState.PENDING, b"done!", b"p")
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task("missing")
    assert (await inspector.task_info("other", info.id)).id == info.id


async def test_single_task_mutations(
    redis: aioredis.Redis, client: Client, inspector: Inspector, clock: ManualClock
) -> None:
    t = await client.enqueue("a", b"1", process_in=100, unique_ttl=300)
    await inspector.run_task("default", t.id)
    assert await redis.hget(Q.task(t.id), "state") == b"pending"
    assert await redis.zcard(Q.scheduled) == 0
    with pytest.raises(errors.TaskStateConflict):
        await inspector.run_task("default", t.id)
    await inspector.archive_task("default", t.id)
    assert await redis.zscore(Q.archived, t.id) == unix_s(clock)
    assert await redis.llen(Q.pending) == 0
    with pytest.raises(errors.TaskStateConflict):
        await inspector.archive_task("default", t.id)
    lock = Q.unique("a", b"1")
    assert await redis.get(lock) == t.id.encode()
    await inspector.delete_task("default", t.id)
    assert await redis.exists(Q.task(t.id), lock) == 0
    assert await redis.zcard(Q.archived) == 0
    with pytest.raises(errors.TaskNotFound):
        await inspector.delete_task("default", t.id)
    active = await client.enqueue("a", b"2")
    await RedisBroker(redis).dequeue(["default"], now_s=unix_s(clock))
    with pytest.raises(errors.TaskStateConflict):
        await inspector.delete_task("default", active.id)


async def test_bulk_mutations(redis: aioredis.Redis, client: Client, inspector: Inspector) -> None:
    for i in range(3):
        await client.enqueue("a", str(i).encode(), process_in=100)
    assert await inspector.archive_all("default", TaskState.SCHEDULED) == 3
    assert await redis.zcard(Q.archived) == 3
    assert await inspector.run_all("default", TaskState.ARCHIVED) == 3
    assert await redis.llen(Q.pending) == 3
    assert await inspector.delete_all("default", TaskState.PENDING) == 3
    assert await redis.keys("asynq:{default}:t:*") == []


async def test_delete_queue_rules(client: Client, inspector: Inspector) -> None:
    await client.enqueue("a", b"1")
    with pytest.raises(errors.Conflict):
        await inspector.delete_queue("default")
    await inspector.delete_queue("default", force=True)
    assert await inspector.queues() == []


async def test_servers_join_workers_and_purge_stale(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    broker = RedisBroker(redis)
    now = unix_s(clock)
    live = ServerInfo(host="h", pid=1, server_id="live", concurrency=2, queues={"default": 1})
    worker = WorkerInfo(host="h", pid=1, server_id="live", task_id="t", task_type="a",
                        task_payload=b"", queue="default", start_time_ns=1, deadline_ns=2)
    await broker.write_server_state(live, [worker], ttl_s=10, now_s=now)
    stale = ServerInfo(host="h", pid=2, server_id="stale", concurrency=2, queues={})
    await broker.write_server_state(stale, [], ttl_s=10, now_s=now - 100)
    servers = await inspector.servers()
    assert [s.info.server_id for s in servers] == ["live"]
    assert servers[0].workers == [worker]
    assert await redis.zscore(keys.ALL_SERVERS, keys.server_key("h", 2, "stale")) is None
    assert wire.decode_server(await redis.get(keys.server_key("h", 1, "live"))) == live
