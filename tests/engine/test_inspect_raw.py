"""Inspector over keys seeded byte for byte the way a Go asynq process writes them.

test_inspect.py goes through aqsh's own Client; here nothing of aqsh writes the data, so a
mismatch between our reading of the layout and Go's writing shows up as a failure.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.broker import ARCHIVED_EXPIRATION_S
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import ServerInfo, TaskMessage, TaskState, WorkerInfo
from aqsh.engine.rdb import RedisBroker
from tests.support import wait_until

Q = keys.queue_keys("default")


@pytest.fixture
def inspector(redis: aioredis.Redis, clock: ManualClock) -> Inspector:
    return Inspector(redis, clock=clock)


async def seed(
    redis: aioredis.Redis,
    state: TaskState,
    task_id: str,
    *,
    queue: str = "default",
    score_s: int = 0,
    group: str = "",
    unique_key: str = "",
    pending_since_ns: int | None = None,
    result: bytes | None = None,
    raw_msg: bytes | None = None,
) -> TaskMessage:
    """Write one task as Go's scripts do: hash fields, its container, the queue name."""
    q = keys.queue_keys(queue)
    msg = TaskMessage(type="email", payload=task_id.encode(), id=task_id, queue=queue, retry=25,
                      timeout_s=1800, unique_key=unique_key, group_key=group)
    fields: dict[str, bytes | str | int] = {
        "msg": raw_msg if raw_msg is not None else wire.encode_task(msg), "state": state.value}
    if pending_since_ns is not None:
        fields["pending_since"] = pending_since_ns
    if unique_key:
        fields["unique_key"] = unique_key
    if group:
        fields["group"] = group
    if result is not None:
        fields["result"] = result
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(keys.ALL_QUEUES, queue)
    pipe.hset(q.task(task_id), mapping=fields)
    if state in (TaskState.PENDING, TaskState.ACTIVE):
        pipe.lpush(q.pending if state is TaskState.PENDING else q.active, task_id)
        if state is TaskState.ACTIVE:
            pipe.zadd(q.lease, {task_id: score_s})
    elif state is TaskState.AGGREGATING:
        pipe.zadd(q.group(group), {task_id: score_s})
        pipe.sadd(q.groups, group)
    else:
        pipe.zadd(q.state_container(state), {task_id: score_s})
    await pipe.execute()
    return msg


async def test_queue_info_reads_every_state_and_survives_asynq_hazards(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.PENDING, "p1", pending_since_ns=clock.now_ns() - 7_500_000_000)
    await seed(redis, TaskState.PENDING, "p2", pending_since_ns=clock.now_ns())
    await seed(redis, TaskState.ACTIVE, "a1", score_s=now + 30)
    await seed(redis, TaskState.SCHEDULED, "s1", score_s=now + 60)
    await seed(redis, TaskState.RETRY, "r1", score_s=now + 90)
    await seed(redis, TaskState.ARCHIVED, "x1", score_s=now - 5)
    await seed(redis, TaskState.COMPLETED, "c1", score_s=now + 3600)
    await seed(redis, TaskState.AGGREGATING, "g1", group="daily", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "g2", group="daily", score_s=now)
    # Both break GetQueueInfo in asynq up to v0.26.0 (§9.2): an empty group name in the set and
    # an id whose hash is gone.
    await redis.sadd(Q.groups, "emptied")
    await redis.zadd(Q.retry, {"no-hash": now + 5})
    await redis.set(Q.processed_day(now), 11)
    await redis.set(Q.failed_day(now), 4)
    await redis.set(Q.processed_day(now - 86400), 100)  # yesterday: not today's figure
    await redis.set(Q.processed_total, 500)
    await redis.set(Q.failed_total, 40)
    info = await inspector.queue_info("default")
    assert (info.pending, info.active, info.scheduled, info.retry, info.archived,
            info.completed, info.aggregating, info.groups) == (2, 1, 1, 2, 1, 1, 2, 2)
    assert info.size == 10
    assert (info.processed, info.failed, info.processed_total, info.failed_total) == (
        11, 4, 500, 40)
    assert info.latency_s == pytest.approx(7.5)  # p1 is the tail: pushed first, runs first
    assert 0 < info.memory_usage_bytes < 1_000_000
    assert (info.paused, info.timestamp_s) == (False, now)


async def test_queue_info_latency_is_zero_without_pending_since(
    redis: aioredis.Redis, inspector: Inspector
) -> None:
    await seed(redis, TaskState.PENDING, "p1")  # moved by RunTask: asynq writes no pending_since
    info = await inspector.queue_info("default")
    assert (info.pending, info.latency_s) == (1, 0.0)


async def test_blank_and_unknown_queue_names_are_refused(inspector: Inspector) -> None:
    with pytest.raises(errors.InvalidArgument):
        await inspector.queue_info("  ")
    for call in (inspector.queue_info("nope"), inspector.task_info("nope", "x"),
                 inspector.list_tasks("nope", TaskState.PENDING),
                 inspector.delete_all("nope", TaskState.ARCHIVED),
                 inspector.pause_queue("nope"), inspector.delete_queue("nope")):
        with pytest.raises(errors.QueueNotFound):
            await call


async def test_history_and_groups(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.AGGREGATING, "g1", group="a", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "g2", group="b", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "g3", group="b", score_s=now)
    assert await inspector.groups("default") == {"a": 1, "b": 2}
    await redis.set(Q.failed_day(now - 2 * 86400), 3)
    stats = await inspector.history("default", 3)
    assert [(s.date, s.failed) for s in stats] == [
        (keys.day_suffix(now), 0), (keys.day_suffix(now - 86400), 0),
        (keys.day_suffix(now - 2 * 86400), 3)]
    with pytest.raises(errors.InvalidArgument):
        await inspector.history("default", 0)


async def test_list_zset_states_in_score_order_with_scores_and_results(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.RETRY, "late", score_s=now + 200)
    await seed(redis, TaskState.RETRY, "soon", score_s=now + 20)
    retry = await inspector.list_tasks("default", TaskState.RETRY)
    assert [(t.id, t.next_process_at_s, t.state) for t in retry] == [
        ("soon", now + 20, TaskState.RETRY), ("late", now + 200, TaskState.RETRY)]
    await seed(redis, TaskState.COMPLETED, "done", score_s=now + 60, result=b"42")
    [done] = await inspector.list_tasks("default", TaskState.COMPLETED)
    assert (done.result, done.next_process_at_s, done.message.payload) == (b"42", 0, b"done")
    await seed(redis, TaskState.ARCHIVED, "old", score_s=now - 100)
    await seed(redis, TaskState.ARCHIVED, "new", score_s=now - 1)
    page2 = await inspector.list_tasks("default", TaskState.ARCHIVED, page=2, page_size=1)
    assert [t.id for t in page2] == ["new"]


async def test_list_aggregating_needs_a_group_and_skips_unreadable_messages(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.AGGREGATING, "g1", group="daily", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "bad", group="daily", score_s=now + 1,
               raw_msg=b"\xff\xff not protobuf")
    await seed(redis, TaskState.AGGREGATING, "other", group="weekly", score_s=now)
    listed = await inspector.list_tasks("default", TaskState.AGGREGATING, group="daily")
    assert [(t.id, t.message.group_key) for t in listed] == [("g1", "daily")]
    with pytest.raises(errors.InvalidArgument):
        await inspector.list_tasks("default", TaskState.AGGREGATING)
    with pytest.raises(errors.InvalidArgument):
        await inspector.list_tasks("default", TaskState.PENDING, page=0)


async def test_task_info_per_state(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.PENDING, "p", pending_since_ns=clock.now_ns())
    await seed(redis, TaskState.SCHEDULED, "s", score_s=now + 60)
    await seed(redis, TaskState.ACTIVE, "a", score_s=now - 1)  # lease already expired
    await seed(redis, TaskState.COMPLETED, "c", score_s=now + 60, result=b"ok")
    pending = await inspector.task_info("default", "p")
    assert (pending.state, pending.next_process_at_s, pending.pending_since_ns) == (
        TaskState.PENDING, now, clock.now_ns())
    assert (await inspector.task_info("default", "s")).next_process_at_s == now + 60
    active = await inspector.task_info("default", "a")
    assert (active.state, active.is_orphaned, active.next_process_at_s) == (
        TaskState.ACTIVE, True, 0)
    assert (await inspector.task_info("default", "c")).result == b"ok"
    with pytest.raises(errors.TaskNotFound):
        await inspector.task_info("default", "missing")


async def test_find_task_looks_in_every_queue(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    for name in ("alpha", "beta", "gamma"):
        await seed(redis, TaskState.PENDING, f"{name}-filler", queue=name)
    await seed(redis, TaskState.RETRY, "wanted", queue="gamma", score_s=now + 30)
    found = await inspector.find_task("wanted")
    assert (found.queue, found.state, found.next_process_at_s) == ("gamma", TaskState.RETRY,
                                                                   now + 30)
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task("wanted", queues=["alpha", "beta"])


async def test_run_aggregating_task_drops_the_emptied_group(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    await seed(redis, TaskState.AGGREGATING, "g1", group="daily", score_s=unix_s(clock))
    await inspector.run_task("default", "g1")
    assert await redis.lrange(Q.pending, 0, -1) == [b"g1"]
    assert await redis.hget(Q.task("g1"), "state") == b"pending"
    assert await redis.exists(Q.group("daily")) == 0
    assert await redis.smembers(Q.groups) == set()


async def test_run_completed_and_conflicts_on_active(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.COMPLETED, "c", score_s=now + 60)
    await inspector.run_task("default", "c")
    assert (await redis.zcard(Q.completed), await redis.llen(Q.pending)) == (0, 1)
    await seed(redis, TaskState.ACTIVE, "a", score_s=now + 30)
    for op in (inspector.run_task, inspector.archive_task, inspector.delete_task):
        with pytest.raises(errors.TaskStateConflict):
            await op("default", "a")
    assert await redis.lrange(Q.active, 0, -1) == [b"a"]
    with pytest.raises(errors.TaskNotFound):
        await inspector.archive_task("default", "missing")


async def test_archive_trims_tasks_archived_over_90_days_ago_with_their_hashes(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.ARCHIVED, "ancient", score_s=now - ARCHIVED_EXPIRATION_S - 1)
    await seed(redis, TaskState.ARCHIVED, "recent", score_s=now - 60)
    await seed(redis, TaskState.PENDING, "p", pending_since_ns=clock.now_ns())
    await inspector.archive_task("default", "p")
    assert await redis.zrange(Q.archived, 0, -1, withscores=True) == [
        (b"recent", now - 60), (b"p", now)]
    assert await redis.exists(Q.task("ancient")) == 0
    assert await redis.llen(Q.pending) == 0
    assert await redis.hget(Q.task("p"), "state") == b"archived"


async def test_delete_releases_only_a_lock_the_task_still_owns(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    mine, theirs = Q.base + "unique:email:mine", Q.base + "unique:email:theirs"
    await seed(redis, TaskState.SCHEDULED, "s1", score_s=now + 60, unique_key=mine)
    await seed(redis, TaskState.SCHEDULED, "s2", score_s=now + 60, unique_key=theirs)
    await redis.set(mine, "s1", ex=300)
    await redis.set(theirs, "someone-else", ex=300)
    await inspector.delete_task("default", "s1")
    assert (await redis.exists(mine), await redis.zrange(Q.scheduled, 0, -1)) == (0, [b"s2"])
    assert await inspector.delete_all("default", TaskState.SCHEDULED) == 1
    assert await redis.get(theirs) == b"someone-else"
    assert await redis.exists(Q.task("s2"), Q.scheduled) == 0


async def test_bulk_operations_per_state(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    for i in range(3):
        await seed(redis, TaskState.PENDING, f"p{i}", pending_since_ns=clock.now_ns())
    assert await inspector.archive_all("default", TaskState.PENDING) == 3
    assert await redis.exists(Q.pending) == 0
    assert await redis.zrange(Q.archived, 0, -1, withscores=True) == [
        (f"p{i}".encode(), now) for i in range(3)]
    assert await inspector.archive_all("default", TaskState.ARCHIVED) == 0
    for i in range(2):
        await seed(redis, TaskState.COMPLETED, f"c{i}", score_s=now + 60)
    assert await inspector.delete_all("default", TaskState.COMPLETED) == 2
    assert await redis.exists(Q.completed, Q.task("c0"), Q.task("c1")) == 0
    await seed(redis, TaskState.AGGREGATING, "g1", group="daily", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "g2", group="daily", score_s=now)
    await seed(redis, TaskState.AGGREGATING, "w1", group="weekly", score_s=now)
    assert await inspector.run_all("default", TaskState.AGGREGATING, group="daily") == 2
    assert set(await redis.lrange(Q.pending, 0, -1)) == {b"g1", b"g2"}
    assert await redis.smembers(Q.groups) == {b"weekly"}
    assert await inspector.delete_all("default", TaskState.AGGREGATING, group="weekly") == 1
    assert await redis.exists(Q.groups, Q.group("weekly"), Q.task("w1")) == 0
    assert await inspector.run_all("default", TaskState.PENDING) == 0
    with pytest.raises(errors.InvalidArgument):
        await inspector.archive_all("default", TaskState.AGGREGATING)
    await seed(redis, TaskState.ACTIVE, "a", score_s=now + 30)
    with pytest.raises(errors.TaskStateConflict):
        await inspector.delete_all("default", TaskState.ACTIVE)
    assert await redis.llen(Q.active) == 1


async def test_delete_queue_follows_asynq_rules(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed(redis, TaskState.COMPLETED, "c", score_s=now + 60)
    await seed(redis, TaskState.ACTIVE, "a", score_s=now + 30)
    with pytest.raises(errors.Conflict, match="not empty"):
        await inspector.delete_queue("default")
    with pytest.raises(errors.Conflict, match="active"):
        await inspector.delete_queue("default", force=True)
    await redis.delete(Q.active)
    # Completed tasks alone leave the queue "empty": it goes, they stay (asynq does the same).
    await inspector.delete_queue("default")
    assert await redis.smembers(keys.ALL_QUEUES) == set()
    assert await redis.exists(Q.completed, Q.task("c"), Q.lease) == 2
    await seed(redis, TaskState.PENDING, "p")
    await seed(redis, TaskState.RETRY, "r", score_s=now + 10)
    await inspector.delete_queue("default", force=True)
    assert await redis.exists(Q.pending, Q.retry, Q.task("p"), Q.task("r")) == 0


async def test_pause_unpause_and_cancel(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    await seed(redis, TaskState.PENDING, "p")
    with pytest.raises(errors.QueueNotPaused):
        await inspector.unpause_queue("default")
    await inspector.pause_queue("default")
    assert await redis.get(Q.paused) == str(unix_s(clock)).encode()
    await inspector.unpause_queue("default")
    assert await redis.exists(Q.paused) == 0
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.CANCEL_CHANNEL)
    try:
        await inspector.cancel_processing("task-7")

        async def cancel_message() -> object:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            return message and message["data"]

        assert await wait_until(cancel_message, message="cancel message") == b"task-7"
    finally:
        await pubsub.aclose()


async def test_servers_drop_workers_of_unknown_servers(
    redis: aioredis.Redis, inspector: Inspector, clock: ManualClock
) -> None:
    now = unix_s(clock)
    broker = RedisBroker(redis)
    server = ServerInfo(host="h", pid=1, server_id="s", concurrency=4, queues={"default": 1})
    await broker.write_server_state(server, [], ttl_s=10, now_s=now)
    orphan = WorkerInfo(host="h", pid=9, server_id="gone", task_id="t", task_type="a",
                        task_payload=b"", queue="default", start_time_ns=1, deadline_ns=2)
    gone = ServerInfo(host="h", pid=9, server_id="gone", concurrency=1, queues={})
    await broker.write_server_state(gone, [orphan], ttl_s=10, now_s=now)
    await redis.delete(keys.server_key("h", 9, "gone"))  # expired key, member still listed
    servers = await inspector.servers()
    assert [(s.info.server_id, s.workers) for s in servers] == [("s", [])]
