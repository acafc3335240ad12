"""Scheduler: entries and history in asynq's layout, one task per fire across replicas, missed
fires, Redis outages, config syncs and shutdown — on a real Redis, time driven by a ManualClock."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock
from aqsh.engine import keys, wire
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scheduler import PeriodicTask, Scheduler
from aqsh.redis_process import RedisProcess
from tests.support import redis_answers, wait_until

START = 1_767_225_600.0 + 7  # 2026-01-01T00:00:07Z
NIGHTLY = PeriodicTask(spec="*/5 * * * *", type="backup", payload=b'{"db":"main"}',
                       queue="ops", max_retry=2, timeout_s=1800, retention_s=3600)


def scheduler(redis: aioredis.Redis, clock: ManualClock) -> Scheduler:
    return Scheduler(RedisBroker(redis), clock=clock)


@pytest.fixture
def start_clock() -> ManualClock:
    return ManualClock(START)


async def test_heartbeat_writes_entries_as_asynq(redis: aioredis.Redis,
                                                 start_clock: ManualClock) -> None:
    sched = scheduler(redis, start_clock)
    entry_id = sched.register(NIGHTLY)
    hourly = sched.register(PeriodicTask(spec="@hourly", type="report", payload=b""))
    await sched.heartbeat()
    assert await redis.zrange(keys.ALL_SCHEDULERS, 0, -1, withscores=True) == [
        (sched.entries_key.encode(), START + 20)]
    assert 0 < await redis.ttl(sched.entries_key) <= 20
    raw = await redis.lrange(sched.entries_key, 0, -1)
    entries = [wire.decode_scheduler_entry(r) for r in raw]
    # LPUSHed soonest first, so the list reads latest first (as asynq's)
    assert [e.id for e in entries] == [hourly, entry_id]
    nightly = entries[1]
    assert (nightly.spec, nightly.task_type, nightly.task_payload) == (
        "*/5 * * * *", "backup", b'{"db":"main"}')
    assert nightly.enqueue_options == [
        'Queue("ops")', "MaxRetry(2)", "Timeout(30m0s)", "Retention(1h0m0s)"]
    assert nightly.next_enqueue_time_ns == int((START - 7 + 300) * 1e9)
    assert nightly.prev_enqueue_time_ns is None  # Go zero time on the wire


async def test_a_fire_enqueues_one_task_and_records_it(redis: aioredis.Redis,
                                                       start_clock: ManualClock) -> None:
    sched = scheduler(redis, start_clock)
    entry_id = sched.register(NIGHTLY)
    assert await sched.fire_due() == []
    start_clock.advance(300)  # 00:05:07
    [info] = await sched.fire_due()
    fire_s = int(START - 7 + 300)
    assert info.id == f"cron-{NIGHTLY.digest()}-{fire_s}"
    task = await Inspector(redis).task_info("ops", info.id)
    assert task.state is TaskState.PENDING
    assert (task.message.type, task.message.payload, task.message.retry) == (
        "backup", b'{"db":"main"}', 2)
    assert (task.message.timeout_s, task.message.retention_s) == (1800, 3600)
    history = await redis.zrange(keys.scheduler_history_key(entry_id), 0, -1, withscores=True)
    [(raw_event, score)] = history
    assert score == int(start_clock.now_s())
    assert wire.decode_enqueue_event(raw_event).task_id == info.id
    [entry] = sched.entries()
    assert entry.prev_enqueue_time_ns == fire_s * 10**9
    assert entry.next_enqueue_time_ns == (fire_s + 300) * 10**9
    assert await sched.fire_due() == []  # nothing new until 00:10


async def test_replicas_store_one_task_per_fire(redis: aioredis.Redis,
                                                start_clock: ManualClock) -> None:
    heard: list[tuple[str, str]] = []
    replicas = [Scheduler(RedisBroker(redis), clock=start_clock,
                          on_fire=lambda t, o: heard.append((t, o))) for _ in range(3)]
    entry_ids = [replica.register(NIGHTLY) for replica in replicas]
    start_clock.advance(300)
    stored = [await replica.fire_due() for replica in replicas]
    assert [len(s) for s in stored] == [1, 0, 0]
    assert heard == [("backup", "stored"), ("backup", "elsewhere"), ("backup", "elsewhere")]
    assert await redis.llen(keys.queue_keys("ops").pending) == 1
    counts = [await redis.zcard(keys.scheduler_history_key(e)) for e in entry_ids]
    assert counts == [1, 0, 0]
    for replica in replicas:  # every replica moved on to the next fire
        assert replica.entries()[0].next_enqueue_time_ns == int((START - 7 + 600) * 1e9)


async def test_missed_fires_run_once(redis: aioredis.Redis, start_clock: ManualClock) -> None:
    sched = scheduler(redis, start_clock)
    sched.register(NIGHTLY)
    start_clock.advance(3 * 300 + 60)  # 00:16:07: fires at :05, :10, :15 were missed
    [info] = await sched.fire_due()
    assert info.id.endswith(f"-{int(START - 7 + 900)}")
    assert await redis.llen(keys.queue_keys("ops").pending) == 1
    assert sched.entries()[0].next_enqueue_time_ns == int((START - 7 + 1200) * 1e9)


async def test_a_fire_during_an_outage_is_retried_with_the_same_id(
    start_clock: ManualClock,
) -> None:
    with RedisProcess(persistent=True) as server:
        redis = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
        heard: list[str] = []
        sched = Scheduler(RedisBroker(redis), clock=start_clock,
                          on_fire=lambda _, outcome: heard.append(outcome))
        sched.register(NIGHTLY)
        start_clock.advance(300)
        server.stop_keep_data()
        assert await sched.fire_due() == []  # failed; the entry stays due
        start_clock.advance(0.5)
        assert await sched.fire_due() == []  # not before the retry delay
        server.start()
        await wait_until(lambda: redis_answers(redis), timeout_s=15, interval_s=0.1,
                         message="redis")
        start_clock.advance(1)
        [info] = await sched.fire_due()
        assert info.id.endswith(f"-{int(START - 7 + 300)}")
        assert heard == ["failed", "stored"]
        await redis.aclose()



async def test_sync_keeps_unchanged_entries_and_retires_removed_ones(
    redis: aioredis.Redis, start_clock: ManualClock
) -> None:
    sched = scheduler(redis, start_clock)
    kept = PeriodicTask(spec="@hourly", type="report", payload=b"")
    kept_id = sched.register(kept)
    removed_id = sched.register(NIGHTLY)
    start_clock.advance(300)
    await sched.fire_due()
    assert await redis.exists(keys.scheduler_history_key(removed_id)) == 1
    sched.sync([kept, PeriodicTask(spec="@daily", type="cleanup", payload=b"")])
    await sched.heartbeat()
    entries = {e.task_type: e.id for e in sched.entries()}
    assert entries.keys() == {"report", "cleanup"}
    assert entries["report"] == kept_id
    assert await redis.exists(keys.scheduler_history_key(removed_id)) == 0
    assert len(await redis.lrange(sched.entries_key, 0, -1)) == 2


async def test_stop_clears_entries_and_history(redis: aioredis.Redis) -> None:
    sched = Scheduler(RedisBroker(redis), heartbeat_interval_s=60)
    entry_id = sched.register(PeriodicTask(spec="@every 1s", type="tick", payload=b"",
                                           retention_s=60))
    await sched.start()
    # Entries are announced at start, and the loop fires on the real clock.
    await wait_until(lambda: redis.exists(sched.entries_key), message="entries written")
    await wait_until(lambda: redis.zcard(keys.scheduler_history_key(entry_id)),
                     timeout_s=5, message="a fire recorded")
    await sched.stop()
    assert await redis.zrange(keys.ALL_SCHEDULERS, 0, -1) == []
    assert await redis.exists(sched.entries_key, keys.scheduler_history_key(entry_id)) == 0
    tasks = await Inspector(redis).list_tasks("default", TaskState.PENDING)
    assert tasks
    assert all(t.message.type == "tick" for t in tasks)


async def test_a_new_entry_is_announced_without_waiting_for_the_heartbeat(
    redis: aioredis.Redis,
) -> None:
    sched = Scheduler(RedisBroker(redis), heartbeat_interval_s=3600)
    await sched.start()
    try:
        await wait_until(lambda: redis.zcard(keys.ALL_SCHEDULERS), message="announced")
        assert await redis.llen(sched.entries_key) == 0
        sched.register(NIGHTLY)
        await wait_until(lambda: redis.llen(sched.entries_key), message="new entry")
    finally:
        await sched.stop()


def test_a_bad_spec_is_refused_before_anything_changes(start_clock: ManualClock) -> None:
    sched = Scheduler(RedisBroker(aioredis.Redis()), clock=start_clock)
    with pytest.raises(errors.InvalidArgument, match="five fields"):
        sched.register(PeriodicTask(spec="* * *", type="x", payload=b""))
    assert sched.entries() == []


async def test_fire_time_header_stamps_each_fire(redis: aioredis.Redis,
                                                 start_clock: ManualClock) -> None:
    sched = scheduler(redis, start_clock)
    sched.register(PeriodicTask(spec="@every 1m", type="x", payload=b"",
                                headers={"team": "ops"}, fire_time_header="submitted-at"))
    start_clock.advance(60)
    [info] = await sched.fire_due()
    assert info.message.headers == {"team": "ops", "submitted-at": str(start_clock.now_ns())}


async def test_write_scheduler_entries_script_replaces_the_list(redis: aioredis.Redis) -> None:
    key = keys.scheduler_entries_key("h:1:s")
    await redis.rpush(key, b"stale")
    reply = await RedisBroker(redis).scripts.run(
        "write_scheduler_entries", [key], [20, b"first", b"second"])
    assert reply == b"OK"
    assert await redis.lrange(key, 0, -1) == [b"second", b"first"]  # LPUSHed in turn
    assert 19 <= await redis.ttl(key) <= 20
    await RedisBroker(redis).scripts.run("write_scheduler_entries", [key], [20])
    assert await redis.exists(key) == 0  # no entries: nothing left behind


async def test_record_scheduler_event_script_keeps_the_newest(redis: aioredis.Redis) -> None:
    key = keys.scheduler_history_key("entry")
    await redis.zadd(key, {b"e1": 1, b"e2": 2, b"e3": 3})
    reply = await RedisBroker(redis).scripts.run("record_scheduler_event", [key], [4, b"e4", 3])
    assert reply == b"OK"
    assert await redis.zrange(key, 0, -1, withscores=True) == [
        (b"e2", 2.0), (b"e3", 3.0), (b"e4", 4.0)]
