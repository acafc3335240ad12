"""The held-run scripts on a real Redis, step by step (aqsh.engine.flow): a concurrency key's
slots and line, the release inside the finishing transitions, the repair sweep, rate windows.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from aqsh.engine import flow, keys
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker

Q = keys.queue_keys("default")
LIMIT_1 = flow.headers(concurrency=flow.Concurrency("deploy:prod", 1))


@pytest.fixture
def broker(redis: aioredis.Redis) -> RedisBroker:
    return RedisBroker(redis)


@pytest.fixture
async def client(redis: aioredis.Redis) -> AsyncIterator[Client]:
    async with Client(redis) as c:
        yield c


def now_s() -> int:
    return int(time.time())


async def ids(redis: aioredis.Redis, key: str) -> list[str]:
    if await redis.type(key) == b"zset":
        return [i.decode() for i in await redis.zrange(key, 0, -1)]
    return [i.decode() for i in await redis.lrange(key, 0, -1)]


async def test_one_slot_holds_the_rest_in_scheduled_in_submission_order(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    for n in range(4):
        await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=LIMIT_1)
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in leased] == ["d0"]
    wait = keys.flow_wait_key("default", "deploy:prod")
    assert await ids(redis, wait) == ["d1", "d2", "d3"]
    # Held runs are plain asynq scheduled tasks, far ahead, with no lease.
    assert await redis.zscore(Q.scheduled, "d1") == flow.HELD_SCORE_S
    assert await redis.zscore(Q.lease, "d1") is None
    assert await ids(redis, Q.active) == ["d0"]
    info = await Inspector(redis).find_task("d2", ["default"])
    assert info.state is TaskState.SCHEDULED
    waiting = await flow.waiting_many(redis, [("default", "d2"), ("default", "d0")])
    assert waiting[0] == flow.Waiting("concurrency", "deploy:prod", 1, waiting[0].since_ms)
    assert waiting[1] is None


async def test_the_finishing_transition_promotes_the_next_waiter(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    for n in range(3):
        await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=LIMIT_1)
    first = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.WAKE_CHANNEL)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        errs = await broker.finish_successes([first[0].message], now_s=now_s())
        assert errs == [None]
        woken = await pubsub.get_message(timeout=5)
    assert woken is not None
    assert woken["data"] == b"default"
    assert await ids(redis, Q.pending) == ["d1"]
    assert await redis.zscore(Q.scheduled, "d1") is None
    slots = keys.flow_slots_key("default", "deploy:prod")
    assert [m.decode() for m in await redis.zrange(slots, 0, -1)] == ["d1"]
    second = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in second] == ["d1"]
    # Its wait is recorded for the metrics (task type, ms).
    waited = await redis.zrange(keys.flow_waited_key("default"), 0, -1)
    assert len(waited) == 1
    assert waited[0].startswith(b"deploy\t")
    taken = await flow.take_waits(redis, "default")
    assert [t for t, _ in taken] == ["deploy"]
    assert await redis.zcard(keys.flow_waited_key("default")) == 0
    # retry and archive release too.
    await broker.retry(second[0].message, retry_at_s=now_s() + 600, error_msg="x",
                       is_failure=True, now_s=now_s())
    third = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in third] == ["d2"]
    await broker.archive(third[0].message, error_msg="boom", now_s=now_s())
    assert await redis.zcard(slots) == 0
    assert not await redis.hexists(keys.flow_registry_key("default"), "deploy:prod")


async def test_a_newcomer_does_not_take_a_slot_reserved_for_a_promoted_waiter(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    await client.enqueue("deploy", b"{}", task_id="a", headers=LIMIT_1)
    await client.enqueue("deploy", b"{}", task_id="b", headers=LIMIT_1)
    first = await broker.dequeue_many(["default"], limit=1, now_s=now_s())
    assert [m.message.id for m in first] == ["a"]
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=1,
                                                            now_s=now_s())] == []
    await broker.done(first[0].message, now_s=now_s())  # b promoted, not yet picked up
    await client.enqueue("deploy", b"{}", task_id="c", headers=LIMIT_1)
    # c sits in pending before b (b went to the front): whichever is dequeued first, only b
    # may run.
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in leased] == ["b"]
    assert await ids(redis, keys.flow_wait_key("default", "deploy:prod")) == ["c"]


async def test_different_keys_do_not_wait_for_each_other(
        broker: RedisBroker, client: Client) -> None:
    for env in ("prod", "staging", "dev"):
        await client.enqueue("deploy", b"{}", task_id=env,
                             headers=flow.headers(concurrency=flow.Concurrency(
                                 f"deploy:{env}", 1)))
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert sorted(m.message.id for m in leased) == ["dev", "prod", "staging"]


async def test_a_dead_holders_slot_is_freed_after_its_lease_and_the_sweep_repairs_the_line(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    for n in range(3):
        await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=LIMIT_1)
    start = now_s()
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=start)] == ["d0"]
    # A foreign tool deletes d1 (the next in line) by hand.
    await Inspector(redis).delete_task("default", "d1")
    # While d0's lease is live nothing moves.
    assert await broker.repair_flow("default", now_s=start + LEASE_DURATION_S - 1) == 0
    # Its worker died: once the lease lapses the slot goes to d2 (d1 is skipped).
    assert await broker.repair_flow("default", now_s=start + LEASE_DURATION_S + 1) == 1
    assert await ids(redis, Q.pending) == ["d2"]
    assert await ids(redis, keys.flow_wait_key("default", "deploy:prod")) == []


async def test_a_rate_window_admits_its_limit_and_delays_the_rest_to_its_end(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    rule = flow.Rate("ping:all", 2, 3600)
    for n in range(5):
        await client.enqueue("ping", b"{}", task_id=f"p{n}", headers=flow.headers(rate=rule))
    now = now_s()
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now)
    assert [m.message.id for m in leased] == ["p0", "p1"]
    window_end = rule.window_start_s(now) + 3600
    held = await redis.zrange(Q.scheduled, 0, -1, withscores=True)
    assert held == [(f"p{n}".encode(), float(window_end)) for n in (2, 3, 4)]
    waiting = await flow.waiting_many(redis, [("default", "p3")])
    assert waiting[0] is not None
    assert (waiting[0].reason, waiting[0].key) == ("rate", "ping:all")
    # The next window admits the next two.
    await broker.forward_if_ready(["default"], now_ns=window_end * 1_000_000_000)
    later = await broker.dequeue_many(["default"], limit=10, now_s=window_end)
    assert len(later) == 2


async def test_a_waiter_run_by_hand_waits_again_at_its_place_in_line(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """An asynq tool that runs a held task (scheduled → pending) cannot break the limit: the
    next dequeue puts it back in line, where its submission time says, not at the end."""
    for n in range(4):
        rule = flow.headers(concurrency=flow.Concurrency("deploy:prod", 1, seq_us=1000 + n))
        await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=rule)
    first = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in first] == ["d0"]
    await Inspector(redis).run_task("default", "d2")
    assert await broker.dequeue_many(["default"], limit=10, now_s=now_s()) == []
    assert await ids(redis, keys.flow_wait_key("default", "deploy:prod")) == ["d1", "d2", "d3"]
    await broker.done(first[0].message, now_s=now_s())
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=now_s())] == ["d1"]


async def test_acquires_arriving_out_of_order_keep_submission_order(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """Two workers race: the later submission reaches the dequeue first (it was enqueued
    first here). The line is by submission time, so the earlier one still goes first."""
    holder = flow.headers(concurrency=flow.Concurrency("k", 1, seq_us=1))
    await client.enqueue("t", b"", task_id="holder", headers=holder)
    running = await broker.dequeue_many(["default"], limit=1, now_s=now_s())
    for task_id, seq in (("late", 20), ("early", 10)):
        await client.enqueue("t", b"", task_id=task_id,
                             headers=flow.headers(concurrency=flow.Concurrency("k", 1, seq)))
    assert await broker.dequeue_many(["default"], limit=10, now_s=now_s()) == []
    assert await ids(redis, keys.flow_wait_key("default", "k")) == ["early", "late"]
    await broker.done(running[0].message, now_s=now_s())
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=now_s())] == ["early"]


async def test_a_run_that_never_waited_records_no_wait_and_leaves_nothing_behind(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    two = flow.headers(concurrency=flow.Concurrency("deploy:prod", 2))
    await client.enqueue("deploy", b"{}", task_id="d0", headers=two)
    (leased,) = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert leased.message.id == "d0"
    assert not [f for f in await redis.hkeys(Q.task("d0")) if f.startswith(b"aqsh_wait")]
    assert await redis.zcard(keys.flow_waited_key("default")) == 0
    assert await broker.finish_successes([leased.message], now_s=now_s()) == [None]
    assert await redis.zcard(keys.flow_slots_key("default", "deploy:prod")) == 0
    assert not await redis.hexists(keys.flow_registry_key("default"), "deploy:prod")
    assert await redis.zcard(keys.flow_waited_key("default")) == 0


async def test_with_nobody_waiting_a_dead_holders_slot_is_freed_by_the_next_acquire(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    start = now_s()
    await client.enqueue("deploy", b"{}", task_id="d0", headers=LIMIT_1)
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=start)] == ["d0"]
    await client.enqueue("deploy", b"{}", task_id="d1", headers=LIMIT_1)
    # d0's worker died; once its lease lapsed, the acquire that meets the full key frees it.
    later = start + LEASE_DURATION_S + 1
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=later)] == ["d1"]
    slots = keys.flow_slots_key("default", "deploy:prod")
    assert [m.decode() for m in await redis.zrange(slots, 0, -1)] == ["d1"]
    assert await redis.zcard(keys.flow_wait_key("default", "deploy:prod")) == 0
