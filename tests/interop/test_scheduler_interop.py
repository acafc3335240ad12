"""aqsh's scheduler entries and history as the Go Inspector reads them (v0.26.0 and v0.24.1,
what Asynqmon pins): what `asynq cron ls` / `asynq cron history` and Asynqmon's scheduler page
show. Then a Go asynq server runs the task a fire enqueued."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scheduler import PeriodicTask, Scheduler
from tests.interop.harness import go, seen


async def test_go_inspector_reads_aqsh_scheduler_entries_and_history(
    redis: aioredis.Redis, redis_url: str
) -> None:
    # The Go Inspector drops entries whose announcement expired by the real clock: start now.
    clock = ManualClock(float(int(time.time())))
    sched = Scheduler(RedisBroker(redis), clock=clock)
    nightly = sched.register(PeriodicTask(
        spec="*/5 * * * *", type="ok:backup", payload=b'{"db":"main"}', max_retry=2,
        timeout_s=1800, retention_s=3600))
    zoned = sched.register(PeriodicTask(spec="CRON_TZ=Europe/Berlin @daily", type="ok:report",
                                        payload=b"", queue="reports"))
    clock.advance(300)
    [fired] = await sched.fire_due()
    await sched.heartbeat()

    entries = {e["id"]: e for e in go("cron", redis_url)}
    assert set(entries) == {nightly, zoned}
    backup = entries[nightly]
    assert (backup["spec"], backup["type"], backup["payload"]) == (
        "*/5 * * * *", "ok:backup", '{"db":"main"}')
    assert backup["opts"] == ['Queue("default")', "MaxRetry(2)", "Timeout(30m0s)",
                              "Retention(1h0m0s)"]
    [entry] = [e for e in sched.entries() if e.id == nightly]
    assert backup["next"] == entry.next_enqueue_time_ns // 10**9
    assert backup["prev_zero"] is False
    assert backup["events"] == [{"task_id": fired.id, "at": int(clock.now_s())}]
    report = entries[zoned]
    assert (report["spec"], report["opts"], report["prev_zero"], report["events"]) == (
        "CRON_TZ=Europe/Berlin @daily", ['Queue("reports")', "MaxRetry(25)"], True, [])

    old = {e["id"]: e for e in go("cron", redis_url, binary="aqsh-interop-v0241")}
    assert set(old) == {nightly, zoned}
    assert old[nightly]["opts"] == backup["opts"]
    assert (old[nightly]["events"], old[zoned]["prev_zero"]) == (1, True)

    go("serve", redis_url, "-queues", "default:1", "-duration", "3s")
    assert [r["id"] for r in await seen(redis)] == [fired.id]
