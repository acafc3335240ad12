"""Client options, defaults and errors, asserted on raw asynq keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.models import TaskInfo, TaskState

Q = keys.queue_keys("default")


@pytest.fixture
def client(redis: aioredis.Redis, clock: ManualClock) -> Client:
    return Client(redis, clock=clock)


async def stored(redis: aioredis.Redis, qname: str, task_id: str) -> dict[bytes, bytes]:
    return await redis.hgetall(keys.queue_keys(qname).task(task_id))


async def test_defaults_match_asynq(redis: aioredis.Redis, client: Client) -> None:
    info = await client.enqueue("email", b"p")
    msg = wire.decode_task((await stored(redis, "default", info.id))[b"msg"])
    assert (msg.queue, msg.retry, msg.timeout_s, msg.deadline_s) == ("default", 25, 1800, 0)
    assert len(info.id) == 36
    assert await redis.smembers(keys.ALL_QUEUES) == {b"default"}
    assert info.state is TaskState.PENDING


async def test_every_option_is_written(redis: aioredis.Redis, client: Client,
                                       clock: ManualClock) -> None:
    deadline = datetime.fromtimestamp(unix_s(clock) + 500, UTC)
    info = await client.enqueue(
        "email", b"p", queue="mail", max_retry=2, timeout=timedelta(seconds=40),
        deadline=deadline, task_id="my-id", retention=60, headers={"a": "b"}, unique_ttl=30)
    h = await stored(redis, "mail", "my-id")
    msg = wire.decode_task(h[b"msg"])
    lock = keys.queue_keys("mail").unique("email", b"p")
    assert (msg.id, msg.retry, msg.timeout_s, msg.deadline_s, msg.retention_s, msg.headers,
            msg.unique_key) == ("my-id", 2, 40, unix_s(clock) + 500, 60, {"a": "b"}, lock)
    assert h[b"unique_key"] == lock.encode()
    assert 29 <= await redis.ttl(lock) <= 30
    assert info.queue == "mail"


async def test_scheduling_and_the_scheduled_lock_ttl(
    redis: aioredis.Redis, client: Client, clock: ManualClock
) -> None:
    info = await client.enqueue("email", b"s", process_in=100, unique_ttl=50)
    assert info.state is TaskState.SCHEDULED
    assert await redis.zscore(Q.scheduled, info.id) == unix_s(clock) + 100
    assert 149 <= await redis.ttl(Q.unique("email", b"s")) <= 150  # wait + window
    past = await client.enqueue("email", b"now", process_at=datetime.fromtimestamp(1, UTC))
    assert past.state is TaskState.PENDING  # a time in the past runs at once


async def test_duplicate_and_id_conflict(client: Client) -> None:
    await client.enqueue("email", b"u", unique_ttl=60)
    with pytest.raises(errors.DuplicateTask):
        await client.enqueue("email", b"u", unique_ttl=60)
    await client.enqueue("email", b"x", task_id="same")
    with pytest.raises(errors.TaskIdConflict):
        await client.enqueue("email", b"y", task_id="same")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_retry": -1}, "max_retry"),
    ({"queue": "  "}, "queue"),
    ({"process_at": datetime.now(UTC), "process_in": 5}, "not both"),
    ({"unique_ttl": 0.5}, "unique_ttl"),
    ({"task_id": " "}, "task_id"),
    ({"timeout": -1}, "negative"),
    ({"deadline": datetime(2030, 1, 1)}, "timezone"),
])
async def test_bad_options_raise_before_writing(
    redis: aioredis.Redis, client: Client, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        await client.enqueue("email", b"p", **kwargs)  # type: ignore[arg-type]
    assert await redis.dbsize() == 0


async def test_payload_must_be_bytes_and_type_non_blank(redis: aioredis.Redis,
                                                        client: Client) -> None:
    with pytest.raises(errors.InvalidArgument, match="bytes"):
        await client.enqueue("email", "text")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="type"):
        await client.enqueue(" ", b"")
    assert await redis.dbsize() == 0


async def test_enqueue_many_is_one_batch_with_per_task_results(
    redis: aioredis.Redis, client: Client
) -> None:
    results = await client.enqueue_many([
        EnqueueRequest(type="a", payload=b"1", task_id="one"),
        EnqueueRequest(type="a", payload=b"2", task_id="one"),
        EnqueueRequest(type="b", payload=b"3", queue="other", process_in=60),
    ])
    assert [type(r).__name__ for r in results] == ["TaskInfo", "TaskIdConflict", "TaskInfo"]
    assert await redis.lrange(Q.pending, 0, -1) == [b"one"]
    assert await redis.smembers(keys.ALL_QUEUES) == {b"default", b"other"}
    with pytest.raises(errors.InvalidArgument):
        await client.enqueue_many([EnqueueRequest(type="a", payload=b"", max_retry=-3)])


def test_default_task_ids_are_distinct_version_4_uuids() -> None:
    import uuid

    from aqsh.engine.client import new_task_id

    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in list(ids)[:50]:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


async def test_a_process_time_later_in_the_same_second_is_still_scheduled(
    redis: aioredis.Redis, client: Client, clock: ManualClock
) -> None:
    now_s = unix_s(clock)
    clock.set(now_s + 0.25)
    soon = await client.enqueue("email", b"soon", process_in=0.5)
    assert soon.state is TaskState.SCHEDULED  # as asynq: after now, at full precision
    assert await redis.zscore(Q.scheduled, soon.id) == now_s  # scored by its whole second
    at = await client.enqueue("email", b"at", unique_ttl=50,
                              process_at=datetime.fromtimestamp(now_s + 100.75, UTC))
    assert await redis.zscore(Q.scheduled, at.id) == now_s + 100
    assert 149 <= await redis.ttl(Q.unique("email", b"at")) <= 150  # int(100.5 + 50)
    assert (await client.enqueue("email", b"now", process_in=0)).state is TaskState.PENDING


async def test_batch_requests_take_timedeltas_and_reject_negative_durations(
    redis: aioredis.Redis, client: Client, clock: ManualClock
) -> None:
    [info] = await client.enqueue_many([EnqueueRequest(
        type="a", payload=b"", timeout=timedelta(minutes=2), retention=timedelta(hours=1),
        process_in=timedelta(seconds=90), unique_ttl=timedelta(seconds=10))])
    assert not isinstance(info, Exception)
    msg = wire.decode_task((await stored(redis, "default", info.id))[b"msg"])
    assert (msg.timeout_s, msg.retention_s) == (120, 3600)
    assert await redis.zscore(Q.scheduled, info.id) == unix_s(clock) + 90
    with pytest.raises(errors.InvalidArgument, match="negative"):
        await client.enqueue_many([EnqueueRequest(type="a", payload=b"", retention=-1)])


def test_task_ids_are_uuid4_and_a_forked_child_does_not_repeat_the_parents() -> None:
    import os
    import uuid

    from aqsh.engine.client import new_task_id

    ids = [new_task_id() for _ in range(600)]  # more than one 4 KiB pool of randomness
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.close(read_end)
        os.write(write_end, " ".join(new_task_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_ids = pipe.read().split()
    os.waitpid(pid, 0)
    parent_ids = [new_task_id() for _ in range(10)]
    assert len(child_ids) == 10
    assert not set(child_ids) & set(parent_ids)


@pytest.mark.parametrize("fast_lane", [False, True])
async def test_a_wake_up_is_published_only_once_its_tasks_exist(
    redis: aioredis.Redis, clock: ManualClock, fast_lane: bool
) -> None:
    """The scripts publish the wake-up themselves, after storing: even when the scripts were
    flushed (Redis restarted), a woken worker finds what woke it — single and batched, new
    queue or known one, with exactly one wake-up per queue and call."""
    listener = redis.pubsub()
    await listener.subscribe(keys.WAKE_CHANNEL)
    await listener.get_message(timeout=1)  # the subscribe confirmation
    seen: list[tuple[str, int]] = []

    async def drain() -> None:
        while message := await listener.get_message(timeout=0.5):
            qname = message["data"].decode()
            seen.append((qname, await redis.llen(keys.queue_keys(qname).pending)))

    async with Client(redis, clock=clock, fast_lane=fast_lane) as client:
        for _ in range(2):  # a new queue (SADD + script), then a known one (script alone)
            await redis.script_flush()
            await client.enqueue("email", b"p", queue="single")
            await drain()
        await redis.script_flush()
        await client.enqueue_many(
            [EnqueueRequest(type="u", payload=b"u", queue="many", unique_ttl=60)]
            + [EnqueueRequest(type="b", payload=bytes([n]), queue="many") for n in range(3)]
            + [EnqueueRequest(type="s", payload=b"s", queue="later", process_in=60)]
            + [EnqueueRequest(type="o", payload=b"o", queue="other")])
        await drain()
    await listener.aclose()
    # each wake-up arrived when all of its call's tasks of that queue were already there
    assert seen == [("single", 1), ("single", 2), ("many", 4), ("other", 1)]


async def test_a_large_batch_over_the_lane_keeps_order_and_per_task_results(
        redis: aioredis.Redis, clock: ManualClock) -> None:
    """enqueue_batch pushes the ids once per chunk, not once per task: conflicts still land
    on the right tasks, the pending list is in the order single enqueues would leave it, and a
    flushed script cache is healed."""
    taken = {3, 260, 599}
    for i in taken:
        await redis.hset(Q.task(f"b{i}"), "msg", b"other")
    await redis.script_flush()
    requests = [EnqueueRequest(type="t", payload=b"", task_id=f"b{i}") for i in range(600)]
    requests.insert(300, EnqueueRequest(type="t", payload=b"", task_id="later", process_in=60))
    async with Client(redis, clock=clock, fast_lane=True) as client:
        results = await client.enqueue_many(requests)
    ids = [r.task_id for r in requests]
    for task_id, result in zip(ids, results, strict=True):
        if task_id in {f"b{i}" for i in taken}:
            assert isinstance(result, errors.TaskIdConflict), task_id
        else:
            assert isinstance(result, TaskInfo), task_id
            assert result.id == task_id
    scheduled = results[300]
    assert isinstance(scheduled, TaskInfo)
    assert scheduled.state is TaskState.SCHEDULED
    fresh = [f"b{i}".encode() for i in range(600) if i not in taken]
    assert await redis.lrange(Q.pending, 0, -1) == fresh[::-1]
    assert await redis.zcard(keys.runs_index_key("default", "t")) == len(fresh) + 1


async def test_a_batch_trims_index_entries_of_gone_tasks_from_the_old_end(
        redis: aioredis.Redis, clock: ManualClock) -> None:
    """As a single enqueue trims up to two per task, a batch trims up to two per task it
    enqueued, oldest first, and stops at the first entry whose task still exists."""
    index = keys.runs_index_key("default", "t")
    await redis.zadd(index, {"gone1": 1, "gone2": 2, "gone3": 3, "kept": 4, "gone5": 5})
    await redis.hset(Q.task("kept"), "msg", b"x")
    client = Client(redis, clock=clock)
    await client.enqueue_many([EnqueueRequest(type="t", payload=b"", task_id="n1"),
                               EnqueueRequest(type="t", payload=b"", task_id="n2")])
    assert await redis.zrange(index, 0, -1) == [b"kept", b"gone5", b"n1", b"n2"]
    await redis.zadd(index, {"old": 0})
    await client.enqueue_many([EnqueueRequest(type="t", payload=b"", task_id="n3")])
    assert (await redis.zrange(index, 0, 0)) == [b"kept"]
