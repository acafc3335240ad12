"""Group aggregation on a real Redis: asynq's keys and scripts, the aggregator loop, the
recoverer's reclaim of stale sets; and the smaller asynq-parity points of issue 14 §3 (the
recoverer's is_failure, cancel_retries).

Times come from a ManualClock; raw keys are asserted, so asynq's layout is what is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.aggregator import Aggregator, GroupSettings
from aqsh.engine.broker import AGGREGATION_TIMEOUT_S
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.maintenance import LeaseExpired, Recoverer
from aqsh.engine.models import TaskMessage, TaskState
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from tests.support import wait_until

Q = keys.queue_keys("default")
ServerFactory = Callable[..., Server]


@pytest.fixture
def client(redis: aioredis.Redis, clock: ManualClock) -> Client:
    return Client(redis, clock=clock)


@pytest.fixture
def broker(redis: aioredis.Redis) -> RedisBroker:
    return RedisBroker(redis)


@pytest.fixture
async def make_server(redis: aioredis.Redis, clock: ManualClock
                      ) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    def factory(handler: Any, **options: Any) -> Server:
        options.setdefault("queues", {"default": 1})
        for loop in ("heartbeat", "forward", "recover", "janitor"):
            options.setdefault(f"{loop}_interval_s", 3600)
        server = Server(RedisBroker(redis), handler, clock=clock, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(shutdown_timeout_s=0)


def joined(group: str, tasks: list[Task]) -> EnqueueRequest:
    """The test aggregator: one task whose payload lists the group's payloads in order."""
    return EnqueueRequest(type=f"batch:{group}", payload=b",".join(t.payload for t in tasks),
                          queue="ignored", max_retry=0)


async def text(redis: aioredis.Redis, key: str, field: str) -> str | None:
    raw = await redis.hget(key, field)
    return raw.decode() if raw is not None else None


# ------------------------------------------------------------------ client: add to group
async def test_group_enqueue_writes_asynq_aggregating_layout(
    redis: aioredis.Redis, client: Client, clock: ManualClock
) -> None:
    info = await client.enqueue("email", b"a", group="daily")
    assert info.state is TaskState.AGGREGATING
    assert info.next_process_at_s == 0
    assert await text(redis, Q.task(info.id), "state") == "aggregating"
    assert await text(redis, Q.task(info.id), "group") == "daily"
    assert wire.decode_task(await redis.hget(Q.task(info.id), "msg")).group_key == "daily"
    assert await redis.zscore(Q.group("daily"), info.id) == unix_s(clock)
    assert await redis.smembers(Q.groups) == {b"daily"}
    assert await redis.sismember(keys.ALL_QUEUES, "default")
    assert await redis.llen(Q.pending) == 0
    with pytest.raises(errors.TaskIdConflict):
        await client.enqueue("email", b"b", group="daily", task_id=info.id)


async def test_unique_group_enqueue_holds_the_lock_without_a_hash_field(
    redis: aioredis.Redis, client: Client
) -> None:
    info = await client.enqueue("email", b"a", group="daily", unique_ttl=300)
    lock = Q.unique("email", b"a")
    assert (await redis.get(lock)).decode() == info.id
    assert 295 <= await redis.ttl(lock) <= 300
    assert await redis.hget(Q.task(info.id), "unique_key") is None  # as asynq (§4.6)
    assert wire.decode_task(await redis.hget(Q.task(info.id), "msg")).unique_key == lock
    with pytest.raises(errors.DuplicateTask):
        await client.enqueue("email", b"a", group="daily", unique_ttl=300)
    assert await redis.zcard(Q.group("daily")) == 1


async def test_group_task_processed_later_is_scheduled_without_its_group(
    redis: aioredis.Redis, client: Client
) -> None:
    """asynq quirk Q3: the schedule path ignores the group, so it comes due as pending."""
    info = await client.enqueue("email", b"a", group="daily", process_in=60)
    assert info.state is TaskState.SCHEDULED
    assert await redis.zscore(Q.scheduled, info.id) is not None
    assert await redis.hget(Q.task(info.id), "group") is None
    assert wire.decode_task(await redis.hget(Q.task(info.id), "msg")).group_key == "daily"
    assert await redis.exists(Q.groups) == 0


async def test_blank_group_is_refused_before_anything_is_written(
    redis: aioredis.Redis, client: Client
) -> None:
    with pytest.raises(errors.InvalidArgument):
        await client.enqueue("email", b"a", group="  ")
    assert await redis.dbsize() == 0


# ------------------------------------------------------------------ aggregation check
async def add(client: Client, clock: ManualClock, group: str, *payloads: bytes) -> list[str]:
    """Tasks joining ``group`` one second apart (scores are whole seconds)."""
    ids = []
    for payload in payloads:
        ids.append((await client.enqueue("email", payload, group=group)).id)
        clock.advance(1)
    return ids


async def test_grace_period_makes_a_set_once_no_task_joined_for_that_long(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    ids = await add(client, clock, "g", b"1", b"2", b"3")
    newest_s = unix_s(clock) - 1
    check = {"grace_period_s": 10, "max_delay_s": 0, "max_size": 0}
    assert await broker.aggregation_check("default", "g", now_s=newest_s + 9, **check) is None
    assert await redis.keys(f"{Q.group('g')}:*") == []
    set_id = await broker.aggregation_check("default", "g", now_s=newest_s + 10, **check)
    assert set_id is not None
    set_key = Q.aggregation_set("g", set_id)
    assert set_key == f"asynq:{{default}}:g:g:{set_id}"
    members = await redis.zrange(set_key, 0, -1, withscores=True)
    assert [(m.decode(), s) for m, s in members] == [
        (ids[0], newest_s - 2), (ids[1], newest_s - 1), (ids[2], newest_s)]
    assert await redis.exists(Q.group("g")) == 0
    assert await redis.smembers(Q.groups) == set()
    assert await redis.zscore(Q.aggregation_sets, set_key) == newest_s + 10 + 120
    # The tasks are still aggregating: their hashes stay until the aggregation is enqueued.
    assert await text(redis, Q.task(ids[0]), "state") == "aggregating"


async def test_max_size_takes_the_oldest_and_keeps_the_rest_grouped(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    ids = await add(client, clock, "g", b"1", b"2", b"3", b"4", b"5")
    now = unix_s(clock)
    check = {"grace_period_s": 3600, "max_delay_s": 0, "max_size": 2}
    first = await broker.aggregation_check("default", "g", now_s=now, **check)
    assert first is not None
    assert [m.decode() for m in await redis.zrange(Q.aggregation_set("g", first), 0, -1)] \
        == ids[:2]
    assert await redis.smembers(Q.groups) == {b"g"}  # 3 left
    second = await broker.aggregation_check("default", "g", now_s=now, **check)
    assert second is not None
    assert second != first
    assert await redis.smembers(Q.groups) == {b"g"}  # 1 left, below max size: not due
    assert await broker.aggregation_check("default", "g", now_s=now, **check) is None
    assert [m.decode() for m in await redis.zrange(Q.group("g"), 0, -1)] == ids[4:]
    assert await redis.zcard(Q.aggregation_sets) == 2


async def test_a_set_of_exactly_max_size_empties_the_group(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    await add(client, clock, "g", b"1", b"2")
    check = {"grace_period_s": 3600, "max_delay_s": 0, "max_size": 2}
    assert await broker.aggregation_check("default", "g", now_s=unix_s(clock), **check)
    assert await redis.smembers(Q.groups) == set()


async def test_max_delay_cuts_a_group_that_keeps_growing(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    oldest_s = unix_s(clock)
    await add(client, clock, "g", *[str(i).encode() for i in range(10)])  # one per second
    check = {"grace_period_s": 5, "max_delay_s": 10, "max_size": 0}
    # The newest joined a second ago (within grace); the oldest waited 9 s, then 10 s.
    assert await broker.aggregation_check("default", "g", now_s=oldest_s + 9, **check) is None
    set_id = await broker.aggregation_check("default", "g", now_s=oldest_s + 10, **check)
    assert set_id is not None
    assert await redis.zcard(Q.aggregation_set("g", set_id)) == 10
    assert await redis.smembers(Q.groups) == set()


async def test_read_and_delete_an_aggregation_set(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    ids = await add(client, clock, "g", b"1", b"2")
    now = unix_s(clock)
    set_id = await broker.aggregation_check("default", "g", now_s=now, grace_period_s=1,
                                            max_delay_s=0, max_size=0)
    assert set_id is not None
    msgs, deadline_s = await broker.read_aggregation_set("default", "g", set_id)
    assert [(m.id, m.payload, m.group_key) for m in msgs] == [
        (ids[0], b"1", "g"), (ids[1], b"2", "g")]
    assert deadline_s == now + AGGREGATION_TIMEOUT_S
    await broker.delete_aggregation_set("default", "g", set_id)
    assert await redis.exists(Q.aggregation_set("g", set_id), Q.task(ids[0]),
                              Q.task(ids[1])) == 0
    assert await redis.zcard(Q.aggregation_sets) == 0
    assert await broker.read_aggregation_set("default", "g", set_id) == ([], 0)


async def test_reclaim_gives_stale_sets_back_to_their_groups_only(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    old = await add(client, clock, "old", b"1", b"2")
    scores = [await redis.zscore(Q.group("old"), i) for i in old]
    stale = await broker.aggregation_check("default", "old", now_s=unix_s(clock),
                                           grace_period_s=1, max_delay_s=0, max_size=0)
    clock.advance(60)
    await add(client, clock, "new", b"3")
    fresh = await broker.aggregation_check("default", "new", now_s=unix_s(clock),
                                           grace_period_s=1, max_delay_s=0, max_size=0)
    assert stale is not None
    assert fresh is not None
    await broker.reclaim_stale_aggregation_sets("default", now_s=unix_s(clock) + 60)
    assert [await redis.zscore(Q.group("old"), i) for i in old] == scores
    assert await redis.exists(Q.aggregation_set("old", stale)) == 0
    assert await redis.zrange(Q.aggregation_sets, 0, -1) == [
        Q.aggregation_set("new", fresh).encode()]
    # asynq quirk Q5: the group's name is not put back into the groups set.
    assert await redis.smembers(Q.groups) == set()


# ------------------------------------------------------------------ the aggregator loop
async def test_server_aggregates_a_group_into_one_task_on_the_groups_queue(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    ran: list[Task] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        ran.append(task)
        return None

    ids = await add(client, clock, "g1", b"a", b"b", b"c")
    other = await client.enqueue("email", b"x", group="g2")
    server = make_server(handler, group_aggregator=joined, group_grace_period_s=5,
                         aggregation_interval_s=0.05)
    await server.start()
    clock.advance(3)  # g1's newest joined 4 s ago, g2's 3 s ago: neither is due
    await asyncio.sleep(0.3)  # several aggregation rounds that must find nothing due
    assert ran == []
    assert await redis.zcard(Q.group("g1")) == 3
    clock.advance(1)  # g1 now due, g2 not
    await wait_until(lambda: ran, message="aggregated task ran")
    assert [(t.type, t.payload, t.queue) for t in ran] == [("batch:g1", b"a,b,c", "default")]
    assert await redis.exists(*[Q.task(i) for i in ids]) == 0
    assert await redis.zcard(Q.aggregation_sets) == 0
    assert await redis.smembers(Q.groups) == {b"g2"}
    assert await text(redis, Q.task(other.id), "state") == "aggregating"


async def test_an_async_aggregator_and_max_size_batches(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    payloads: list[bytes] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        payloads.append(task.payload)
        return None

    async def aggregate(group: str, tasks: list[Task]) -> EnqueueRequest:
        await asyncio.sleep(0)
        return joined(group, tasks)

    # A second apart: tasks of one second are ordered by id in the zset, as in asynq.
    await add(client, clock, "g", *[str(i).encode() for i in range(5)])
    server = make_server(handler, group_aggregator=aggregate, group_grace_period_s=3600,
                         group_max_size=2, aggregation_interval_s=0.05)
    await server.start()
    await wait_until(lambda: len(payloads) == 2, message="two full batches")
    await asyncio.sleep(0.2)  # the fifth task waits: not at max size, grace not over
    assert sorted(payloads) == [b"0,1", b"2,3"]
    assert await redis.zcard(Q.group("g")) == 1


async def test_a_failing_aggregator_loses_nothing_the_recoverer_gives_tasks_back(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    calls: list[int] = []

    def aggregate(group: str, tasks: list[Task]) -> EnqueueRequest:
        calls.append(len(tasks))
        if len(calls) == 1:
            raise RuntimeError("aggregator bug")
        return joined(group, tasks)

    ids = await add(client, clock, "g", b"a", b"b")
    aggregator = Aggregator(broker, client, ["default"], clock, aggregate,
                            GroupSettings(grace_period_s=1))
    with structlog.testing.capture_logs() as logs:
        assert await aggregator.run_once() == 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["group.aggregate_failed"]
    assert await redis.zcard(Q.aggregation_sets) == 1
    assert await text(redis, Q.task(ids[0]), "state") == "aggregating"

    recoverer = Recoverer(broker, ["default"], clock, retry_delay=lambda n, e, t: 0.0)
    await recoverer.run_once()  # the set is not stale yet
    assert await redis.zcard(Q.group("g")) == 0
    clock.advance(AGGREGATION_TIMEOUT_S)
    recoverer = Recoverer(broker, ["default"], clock, retry_delay=lambda n, e, t: 0.0)
    await recoverer.run_once()
    assert [m.decode() for m in await redis.zrange(Q.group("g"), 0, -1)] == ids
    assert await redis.zcard(Q.aggregation_sets) == 0
    # Q5: the group is seen again once another task joins it; then all three go together.
    await client.enqueue("email", b"c", group="g")
    clock.advance(1)
    assert await aggregator.run_once() == 1
    assert calls == [2, 3]
    pending = [wire.decode_task(await redis.hget(Q.task(i.decode()), "msg"))
               for i in await redis.lrange(Q.pending, 0, -1)]
    assert [(m.type, m.payload) for m in pending] == [("batch:g", b"a,b,c")]


async def test_a_queue_with_groups_and_no_aggregator_is_warned_about(
    broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    aggregator = Aggregator(broker, None, ["default", "other"], clock, None)
    with structlog.testing.capture_logs() as logs:
        await aggregator.run_once()
        await client.enqueue("email", b"a", group="g")
        await aggregator.run_once()
        await aggregator.run_once()  # same groups, soon after: said once
        await client.enqueue("email", b"b", group="h")
        await aggregator.run_once()  # a new group: said again
    warnings = [(e["queue"], e["groups"]) for e in logs if e["event"] == "group.no_aggregator"]
    assert warnings == [("default", ["g"]), ("default", ["g", "h"])]


async def test_per_group_settings_and_groups_left_to_other_servers(
    redis: aioredis.Redis, broker: RedisBroker, client: Client, clock: ManualClock
) -> None:
    def settings(qname: str, group: str) -> GroupSettings | None:
        return GroupSettings(grace_period_s=1) if group == "mine" else None

    aggregator = Aggregator(broker, client, ["default"], clock, joined, group_settings=settings)
    await client.enqueue("email", b"a", group="mine")
    await client.enqueue("email", b"b", group="theirs")
    clock.advance(1)
    with structlog.testing.capture_logs() as logs:
        assert await aggregator.run_once() == 1
    warnings = [(e["queue"], e["groups"]) for e in logs if e["event"] == "group.no_aggregator"]
    assert warnings == [("default", ["theirs"])]
    assert await redis.zcard(Q.group("theirs")) == 1
    assert await redis.smembers(Q.groups) == {b"theirs"}


async def test_server_without_an_aggregator_warns_at_start(
    make_server: ServerFactory, client: Client
) -> None:
    await client.enqueue("email", b"a", group="g")

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return None

    with structlog.testing.capture_logs() as logs:
        server = make_server(handler)
        await server.start()
        await wait_until(lambda: any(e["event"] == "group.no_aggregator" for e in logs),
                         message="warning logged")


def test_grace_period_below_one_second_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 s"):
        GroupSettings(grace_period_s=0.5)


# ------------------------------------------------------------------ §3: parity points
async def seed_abandoned(redis: aioredis.Redis, clock: ManualClock, task_id: str) -> None:
    m = TaskMessage(type="x", id=task_id, queue="default", retry=3, retried=1, timeout_s=60)
    await redis.hset(Q.task(task_id), mapping={"msg": wire.encode_task(m), "state": "active"})
    await redis.lpush(Q.active, task_id)
    await redis.zadd(Q.lease, {task_id: unix_s(clock) - 31})


@pytest.mark.parametrize("counts", [True, False])
async def test_recoverer_asks_the_servers_is_failure(
    redis: aioredis.Redis, make_server: ServerFactory, clock: ManualClock, counts: bool
) -> None:
    await seed_abandoned(redis, clock, "r1")
    seen: list[BaseException] = []

    def is_failure(exc: BaseException) -> bool:
        seen.append(exc)
        return counts

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return None

    server = make_server(handler, retry_delay=lambda n, e, t: 100.0, is_failure=is_failure)
    assert await server.recoverer.run_once() == 1
    assert [type(e) for e in seen] == [LeaseExpired]
    assert str(seen[0]) == "asynq: task lease expired"
    msg = wire.decode_task(await redis.hget(Q.task("r1"), "msg"))
    assert msg.retried == (2 if counts else 1)
    assert await redis.zscore(Q.retry, "r1") == unix_s(clock) + 100
    assert int(await redis.get(Q.failed_total) or 0) == (1 if counts else 0)


@pytest.mark.parametrize("cancel_retries", [False, True])
async def test_a_cancelled_task_is_archived_unless_cancel_retries(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, cancel_retries: bool
) -> None:
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        await asyncio.Event().wait()  # lets the cancellation end it
        return None

    options: dict[str, Any] = {"retry_delay": lambda n, e, t: 600.0}
    if cancel_retries:
        options["cancel_retries"] = True
    server = make_server(handler, **options)
    await server.start()
    info = await client.enqueue("slow", b"", max_retry=5)
    await asyncio.wait_for(started.wait(), 10)

    async def subscribed() -> bool:
        return bool((await redis.pubsub_numsub(keys.CANCEL_CHANNEL))[0][1])

    await wait_until(subscribed, message="subscribed")
    await RedisBroker(redis).publish_cancel(info.id)
    where = Q.retry if cancel_retries else Q.archived
    await wait_until(lambda: redis.zscore(where, info.id), message="cancel recorded")
    msg = wire.decode_task(await redis.hget(Q.task(info.id), "msg"))
    assert msg.error_msg == "context canceled"
    assert msg.retried == (1 if cancel_retries else 0)
