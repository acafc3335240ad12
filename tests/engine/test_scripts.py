"""Every Lua transition: seed raw asynq keys, run the script through RedisBroker, assert raw keys.

Raw keys are asserted (not our own read-back) so that compatibility with asynq's layout is what
the tests check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.broker import LEASE_DURATION_S, MAX_INT64, STATS_TTL_S
from aqsh.engine.models import TaskMessage
from aqsh.engine.rdb import RedisBroker

Q = keys.queue_keys("default")


def msg(task_id: str = "t1", **fields: object) -> TaskMessage:
    base = TaskMessage(type="email", payload=b'{"to":"a"}', id=task_id, queue="default",
                       retry=3, timeout_s=60)
    return msgspec.structs.replace(base, **fields) if fields else base


async def seed_active(r: aioredis.Redis, m: TaskMessage, lease_s: int) -> None:
    """An active task exactly as asynq's dequeue leaves it."""
    q = keys.queue_keys(m.queue)
    await r.hset(q.task(m.id), mapping={"msg": wire.encode_task(m), "state": "active"})
    await r.lpush(q.active, m.id)
    await r.zadd(q.lease, {m.id: lease_s})


async def seed_pending(r: aioredis.Redis, m: TaskMessage, since_ns: int = 1) -> None:
    q = keys.queue_keys(m.queue)
    await r.hset(q.task(m.id), mapping={
        "msg": wire.encode_task(m), "state": "pending", "pending_since": since_ns})
    await r.lpush(q.pending, m.id)


@pytest.fixture(params=[False, True], ids=["redis-py", "fast-lane"])
async def broker(
    redis: aioredis.Redis, request: pytest.FixtureRequest
) -> AsyncIterator[RedisBroker]:
    """Every transition through redis-py and through the broker's fast lane (as aqsh serve
    runs it): same keys, same replies, same errors."""
    made = RedisBroker(redis, fast_lane=request.param)
    assert (made.lane is not None) is request.param
    yield made
    await made.close_fast_lane()


async def test_enqueue_writes_hash_and_pushes_id(redis: aioredis.Redis, broker: RedisBroker,
                                                  clock: ManualClock) -> None:
    m = msg()
    await broker.enqueue(m, now_ns=clock.now_ns())
    h = await redis.hgetall(Q.task("t1"))
    assert h[b"state"] == b"pending"
    assert h[b"pending_since"] == str(clock.now_ns()).encode()
    assert wire.decode_task(h[b"msg"]) == m
    assert await redis.lrange(Q.pending, 0, -1) == [b"t1"]


async def test_enqueue_id_conflict(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await broker.enqueue(msg(), now_ns=1)
    with pytest.raises(errors.TaskIdConflict):
        await broker.enqueue(msg(payload=b"other"), now_ns=2)
    assert await redis.llen(Q.pending) == 1


async def test_enqueue_unique_lock_duplicate_and_conflict(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    lock = Q.unique("email", b'{"to":"a"}')
    m = msg(unique_key=lock)
    await broker.enqueue_unique(m, ttl_s=100, now_ns=5)
    assert await redis.get(lock) == b"t1"
    assert 99 <= await redis.ttl(lock) <= 100
    assert (await redis.hget(Q.task("t1"), "unique_key")) == lock.encode()
    with pytest.raises(errors.DuplicateTask):
        await broker.enqueue_unique(msg("t2", unique_key=lock), ttl_s=100, now_ns=6)
    # Id conflict: a different lock is taken first and kept (asynq Q1).
    other = Q.unique("email", b"x")
    with pytest.raises(errors.TaskIdConflict):
        await broker.enqueue_unique(msg("t1", unique_key=other, payload=b"x"), ttl_s=50,
                                    now_ns=7)
    assert await redis.get(other) == b"t1"
    assert await redis.lrange(Q.pending, 0, -1) == [b"t1"]


async def test_schedule_and_schedule_unique(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await broker.schedule(msg(), process_at_s=1_700_000_100)
    assert await redis.hgetall(Q.task("t1")) == {
        b"msg": wire.encode_task(msg()), b"state": b"scheduled"}
    assert await redis.zrange(Q.scheduled, 0, -1, withscores=True) == [(b"t1", 1_700_000_100.0)]
    raw = await redis.eval("return redis.call('ZSCORE', KEYS[1], ARGV[1])", 1, Q.scheduled, "t1")
    assert raw == b"1700000100"  # integer score, as the Go Inspector parses it
    with pytest.raises(errors.TaskIdConflict):
        await broker.schedule(msg(), process_at_s=1)
    lock = Q.unique("email", b"u")
    await broker.schedule_unique(msg("t2", unique_key=lock, payload=b"u"),
                                 process_at_s=1_700_000_200, ttl_s=300)
    assert await redis.get(lock) == b"t2"
    assert await redis.hget(Q.task("t2"), "unique_key") == lock.encode()
    with pytest.raises(errors.DuplicateTask):
        await broker.schedule_unique(msg("t3", unique_key=lock, payload=b"u"),
                                     process_at_s=1_700_000_200, ttl_s=300)


async def test_dequeue_leases_and_clears_pending_since(
    redis: aioredis.Redis, broker: RedisBroker, clock: ManualClock
) -> None:
    await seed_pending(redis, msg("a"))
    await seed_pending(redis, msg("b"))
    now = unix_s(clock)
    leased = await broker.dequeue(["default"], now_s=now)
    assert leased is not None
    assert leased.message.id == "a"  # FIFO: first pushed, first popped
    assert leased.lease_expires_s == now + LEASE_DURATION_S
    h = await redis.hgetall(Q.task("a"))
    assert h[b"state"] == b"active"
    assert b"pending_since" not in h
    assert await redis.lrange(Q.active, 0, -1) == [b"a"]
    assert await redis.zscore(Q.lease, "a") == now + LEASE_DURATION_S
    batch = await broker.dequeue_many(["default"], limit=10, now_s=now)
    assert [x.message.id for x in batch] == ["b"]
    assert await broker.dequeue(["default"], now_s=now) is None


async def test_dequeue_skips_paused_queue_and_tries_next(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    await seed_pending(redis, msg("p1"))
    await seed_pending(redis, msg("c1", queue="critical"))
    await broker.pause("default", now_s=10)
    assert await redis.get(Q.paused) == b"10"
    leased = await broker.dequeue_many(["default", "critical"], limit=5, now_s=10)
    assert [x.message.id for x in leased] == ["c1"]
    assert await redis.lrange(Q.pending, 0, -1) == [b"p1"]
    with pytest.raises(errors.QueueAlreadyPaused):
        await broker.pause("default", now_s=11)
    await broker.unpause("default")
    with pytest.raises(errors.QueueNotPaused):
        await broker.unpause("default")
    assert [x.message.id for x in await broker.dequeue_many(["default"], limit=5, now_s=12)] == [
        "p1"]


async def test_dequeue_drops_id_without_hash_leaving_no_orphan(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    await redis.lpush(Q.pending, "ghost")
    assert await broker.dequeue(["default"], now_s=10) is None
    assert await redis.exists(Q.task("ghost"), Q.active, Q.lease) == 0


async def test_done_deletes_counts_and_releases_lock(
    redis: aioredis.Redis, broker: RedisBroker, clock: ManualClock
) -> None:
    lock = Q.unique("email", b'{"to":"a"}')
    m = msg(unique_key=lock)
    await seed_active(redis, m, 100)
    await redis.set(lock, "t1")
    now = unix_s(clock)
    await broker.done(m, now_s=now)
    assert await redis.exists(Q.task("t1"), lock) == 0
    assert await redis.llen(Q.active) == 0
    assert await redis.zcard(Q.lease) == 0
    day = Q.processed_day(now)
    assert await redis.get(day) == b"1"
    assert STATS_TTL_S - 5 <= await redis.ttl(day) <= STATS_TTL_S  # EXPIREAT now + 90 days
    assert await redis.get(Q.processed_total) == b"1"
    with pytest.raises(errors.TaskNotFound):
        await broker.done(m, now_s=now)


async def test_done_keeps_a_lock_owned_by_another_task(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    lock = Q.unique("email", b"z")
    m = msg(unique_key=lock)
    await seed_active(redis, m, 100)
    await redis.set(lock, "someone-else")
    await broker.done(m, now_s=50)
    assert await redis.get(lock) == b"someone-else"


async def test_processed_total_wraps_at_max_int64(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    await seed_active(redis, msg(), 100)
    await redis.set(Q.processed_total, MAX_INT64)
    await broker.done(msg(), now_s=50)
    assert await redis.get(Q.processed_total) == b"1"


async def test_mark_complete_keeps_task_for_retention(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    m = msg(retention_s=3600)
    await seed_active(redis, m, 100)
    await redis.hset(Q.task("t1"), "result", b"out")
    await broker.mark_as_complete(m, now_s=1000)
    h = await redis.hgetall(Q.task("t1"))
    assert h[b"state"] == b"completed"
    assert h[b"result"] == b"out"
    assert wire.decode_task(h[b"msg"]).completed_at_s == 1000
    assert await redis.zscore(Q.completed, "t1") == 4600
    assert await redis.get(Q.processed_total) == b"1"
    assert await redis.llen(Q.active) == 0


async def test_mark_complete_errors(redis: aioredis.Redis, broker: RedisBroker) -> None:
    m = msg(retention_s=10)
    with pytest.raises(errors.TaskNotFound):
        await broker.mark_as_complete(m, now_s=1)
    await seed_active(redis, m, 100)
    await redis.zadd(Q.completed, {"t1": 5})
    with pytest.raises(errors.AqshError, match="INTERNAL"):
        await broker.mark_as_complete(m, now_s=1)


async def test_finish_successes_pipelines_done_and_complete(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    a, b = msg("a"), msg("b", retention_s=60)
    await seed_active(redis, a, 100)
    await seed_active(redis, b, 100)
    await redis.script_flush()  # NOSCRIPT path: loaded and re-sent once
    results = await broker.finish_successes([a, b, msg("missing")], now_s=10)
    assert results[0] is None
    assert results[1] is None
    assert isinstance(results[2], errors.TaskNotFound)
    assert await redis.exists(Q.task("a")) == 0
    assert await redis.hget(Q.task("b"), "state") == b"completed"
    assert await redis.get(Q.processed_total) == b"2"


async def test_a_result_is_stored_with_its_completion_or_not_at_all(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    """Under maxmemory, Redis lets a script that has already written go on writing: a result
    written apart from the completion was refused while the completion went through."""
    b = msg("b", retention_s=60)
    await seed_active(redis, b, 100)
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        refused = await broker.finish_successes([b], now_s=10, results=[b"the result"])
    finally:
        await redis.config_set("maxmemory", 0)
    assert isinstance(refused[0], errors.BrokerUnavailable)
    assert await redis.hget(Q.task("b"), "state") == b"active"  # nothing happened: retried
    assert await broker.finish_successes([b], now_s=10, results=[b"the result"]) == [None]
    assert await redis.hmget(Q.task("b"), "state", "result") == [b"completed", b"the result"]
    missing = await broker.finish_successes([msg("gone", retention_s=60)], now_s=10,
                                            results=[b"x"])
    assert isinstance(missing[0], errors.TaskNotFound)
    assert await redis.exists(Q.task("gone")) == 0  # no stray hash for a task not active


async def test_requeue_puts_task_next_in_line(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await seed_pending(redis, msg("older"))
    await seed_active(redis, msg(), 100)
    await broker.requeue(msg())
    assert await redis.lrange(Q.pending, 0, -1) == [b"older", b"t1"]  # tail = popped next
    h = await redis.hgetall(Q.task("t1"))
    assert h[b"state"] == b"pending"
    assert b"pending_since" not in h
    assert await redis.exists(Q.processed_total) == 0
    with pytest.raises(errors.TaskNotFound):
        await broker.requeue(msg())


async def test_retry_failure_and_non_failure(
    redis: aioredis.Redis, broker: RedisBroker, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await seed_active(redis, msg(), 100)
    await broker.retry(msg(), retry_at_s=2000, error_msg="boom", is_failure=True, now_s=now)
    h = await redis.hgetall(Q.task("t1"))
    assert h[b"state"] == b"retry"
    stored = wire.decode_task(h[b"msg"])
    assert (stored.retried, stored.error_msg, stored.last_failed_at_s) == (1, "boom", now)
    assert await redis.zscore(Q.retry, "t1") == 2000
    assert await redis.mget(Q.processed_total, Q.failed_total,
                            Q.processed_day(now), Q.failed_day(now)) == [b"1"] * 4
    await redis.zrem(Q.retry, "t1")
    await seed_active(redis, stored, 100)
    await broker.retry(stored, retry_at_s=3000, error_msg="again", is_failure=False, now_s=now)
    assert wire.decode_task(await redis.hget(Q.task("t1"), "msg")).retried == 1
    assert await redis.get(Q.failed_total) == b"1"


async def test_retry_resets_both_totals_at_max(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await seed_active(redis, msg(), 100)
    await redis.mset({Q.processed_total: MAX_INT64, Q.failed_total: 77})
    await broker.retry(msg(), retry_at_s=5, error_msg="e", is_failure=True, now_s=1)
    assert await redis.mget(Q.processed_total, Q.failed_total) == [b"1", b"1"]


async def test_archive_counts_and_trims_with_hashes(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    now = 1_700_000_000
    old_cutoff = now - 90 * 24 * 3600
    await redis.hset(Q.task("ancient"), mapping={"msg": b"x", "state": "archived"})
    await redis.zadd(Q.archived, {"ancient": old_cutoff - 1})
    await seed_active(redis, msg(), 100)
    await broker.archive(msg(), error_msg="gave up", now_s=now)
    h = await redis.hgetall(Q.task("t1"))
    assert h[b"state"] == b"archived"
    stored = wire.decode_task(h[b"msg"])
    assert (stored.error_msg, stored.last_failed_at_s, stored.retried) == ("gave up", now, 0)
    assert await redis.zrange(Q.archived, 0, -1) == [b"t1"]
    assert await redis.exists(Q.task("ancient")) == 0
    assert await redis.mget(Q.processed_total, Q.failed_total) == [b"1", b"1"]


async def test_archive_keeps_at_most_9999(redis: aioredis.Redis, broker: RedisBroker) -> None:
    now = 1_700_000_000
    pipe = redis.pipeline(transaction=False)
    for i in range(10_000):
        pipe.zadd(Q.archived, {f"a{i}": now - 10_000 + i})
        pipe.hset(Q.task(f"a{i}"), mapping={"msg": b"x", "state": "archived"})
    await pipe.execute()
    await seed_active(redis, msg(), 100)
    await broker.archive(msg(), error_msg="e", now_s=now)
    assert await redis.zcard(Q.archived) == 9_999
    assert await redis.exists(Q.task("a0"), Q.task("a1")) == 0
    assert await redis.exists(Q.task("a2")) == 1
    assert await redis.zscore(Q.archived, "t1") == now


async def test_forward_moves_due_tasks_and_groups(
    redis: aioredis.Redis, broker: RedisBroker, clock: ManualClock
) -> None:
    now = unix_s(clock)
    for tid, score in (("due", now), ("later", now + 5)):
        await redis.hset(Q.task(tid), mapping={"msg": wire.encode_task(msg(tid)),
                                                "state": "scheduled"})
        await redis.zadd(Q.scheduled, {tid: score})
    await redis.hset(Q.task("grp"), mapping={"msg": b"m", "state": "retry", "group": "g1"})
    await redis.zadd(Q.retry, {"grp": now - 1})
    moved = await broker.forward_if_ready(["default"], now_ns=clock.now_ns())
    assert moved == 2
    assert await redis.lrange(Q.pending, 0, -1) == [b"due"]
    assert await redis.hget(Q.task("due"), "pending_since") == str(clock.now_ns()).encode()
    assert await redis.hget(Q.task("due"), "state") == b"pending"
    assert await redis.zrange(Q.scheduled, 0, -1) == [b"later"]
    assert await redis.zscore(Q.group("g1"), "grp") == now
    assert await redis.hget(Q.task("grp"), "state") == b"aggregating"


async def test_forward_loops_past_the_per_call_limit(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    pipe = redis.pipeline(transaction=False)
    for i in range(250):
        pipe.hset(Q.task(f"s{i}"), mapping={"msg": b"m", "state": "scheduled"})
        pipe.zadd(Q.scheduled, {f"s{i}": 1})
    await pipe.execute()
    assert await broker.forward_if_ready(["default"], now_ns=10 * 10**9) == 250
    assert await redis.llen(Q.pending) == 250


async def test_extend_lease_reports_lost_leases(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await seed_active(redis, msg("a"), 100)
    expires, lost = await broker.extend_leases("default", ["a", "gone"], now_s=200)
    assert expires == 200 + LEASE_DURATION_S
    assert lost == ["gone"]
    assert await redis.zscore(Q.lease, "a") == 230
    assert await redis.zscore(Q.lease, "gone") is None  # XX: never adds


async def test_list_lease_expired(redis: aioredis.Redis, broker: RedisBroker) -> None:
    await seed_active(redis, msg("old"), 100)
    await seed_active(redis, msg("fresh"), 500)
    await redis.zadd(Q.lease, {"nohash": 50})
    expired = await broker.list_lease_expired(["default"], cutoff_s=200)
    assert [m.id for m in expired] == ["old"]


async def test_delete_expired_completed(redis: aioredis.Redis, broker: RedisBroker) -> None:
    pipe = redis.pipeline(transaction=False)
    for i in range(130):
        pipe.hset(Q.task(f"c{i}"), mapping={"msg": b"m", "state": "completed"})
        pipe.zadd(Q.completed, {f"c{i}": 100 if i < 120 else 900})
    await pipe.execute()
    assert await broker.delete_expired_completed("default", now_s=500, batch_size=50) == 120
    assert await redis.zcard(Q.completed) == 10
    assert await redis.exists(Q.task("c0")) == 0
    assert await redis.exists(Q.task("c125")) == 1


async def test_write_result_only_on_existing_task(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    await seed_active(redis, msg(), 100)
    assert await broker.write_result("default", "t1", b"\x00bin") == 4
    assert await redis.hget(Q.task("t1"), "result") == b"\x00bin"
    with pytest.raises(errors.TaskNotFound):
        await broker.write_result("default", "nope", b"x")
    assert await redis.exists(Q.task("nope")) == 0


async def test_server_state_write_and_clear(redis: aioredis.Redis, broker: RedisBroker) -> None:
    from aqsh.engine.models import ServerInfo, WorkerInfo

    info = ServerInfo(host="h", pid=7, server_id="sid", concurrency=4, queues={"default": 1},
                      start_time_ns=10**18)
    worker = WorkerInfo(host="h", pid=7, server_id="sid", task_id="t1", task_type="email",
                        task_payload=b"p", queue="default", start_time_ns=10**18,
                        deadline_ns=2 * 10**18)
    await broker.write_server_state(info, [worker], ttl_s=10, now_s=1000)
    skey, wkey = keys.server_key("h", 7, "sid"), keys.workers_key("h", 7, "sid")
    assert skey == "asynq:servers:{h:7:sid}"
    assert wire.decode_server(await redis.get(skey)) == info
    assert 9 <= await redis.ttl(skey) <= 10
    assert wire.decode_worker((await redis.hgetall(wkey))[b"t1"]) == worker
    assert await redis.zscore(keys.ALL_SERVERS, skey) == 1010
    assert await redis.zscore(keys.ALL_WORKERS, wkey) == 1010
    await broker.clear_server_state("h", 7, "sid")
    assert await redis.exists(skey, wkey) == 0
    assert await redis.zcard(keys.ALL_SERVERS) == 0


async def test_connection_failure_is_broker_unavailable() -> None:
    from aqsh.redis_process import free_port

    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    broker = RedisBroker(client)
    with pytest.raises(errors.BrokerUnavailable):
        await broker.enqueue(msg(), now_ns=1)
    await client.aclose()


async def test_enqueue_batch_script_matches_single_enqueue(
    redis: aioredis.Redis, broker: RedisBroker, clock: ManualClock
) -> None:
    await broker.enqueue(msg("taken"), now_ns=1)
    a, b = msg("a"), msg("b")
    from aqsh.engine.client import _packed

    packed = (_packed(b"a", wire.encode_task(a)) + _packed(b"taken", b"other")
              + _packed(b"b", wire.encode_task(b)))
    reply = await broker.scripts.run("enqueue_batch", [Q.pending],
                                     [clock.now_ns(), Q.task_prefix, packed])
    assert reply == [1, 0, 1]
    assert await redis.lrange(Q.pending, 0, -1) == [b"b", b"a", b"taken"]
    assert await redis.hgetall(Q.task("a")) == {
        b"msg": wire.encode_task(a), b"state": b"pending",
        b"pending_since": str(clock.now_ns()).encode()}
    assert wire.decode_task(await redis.hget(Q.task("taken"), "msg")) == msg("taken")


async def test_enqueue_scripts_publish_the_wake_up_when_asked(
    redis: aioredis.Redis, broker: RedisBroker
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.WAKE_CHANNEL)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await broker.scripts.run("enqueue", [Q.task("w1"), Q.pending],
                             [wire.encode_task(msg("w1")), "w1", 1, keys.WAKE_CHANNEL, "default"])
    lock = Q.unique("email", b"w2")
    await broker.scripts.run("enqueue_unique", [lock, Q.task("w2"), Q.pending],
                             ["w2", 60, wire.encode_task(msg("w2", unique_key=lock)), 1,
                              keys.WAKE_CHANNEL, "default"])
    await broker.enqueue(msg("w3"), now_ns=1)  # the broker's plain path publishes nothing
    got = []
    while (message := await pubsub.get_message(timeout=0.5)) is not None:
        got.append(message["data"])
    assert got == [b"default", b"default"]
    assert await redis.lrange(Q.pending, 0, -1) == [b"w3", b"w2", b"w1"]
    await pubsub.aclose()
