"""``aqsh admin`` against the Go Inspector on one Redis: the figures and listings the admin
commands print are the ones the real asynq Inspector (what the asynq CLI and Asynqmon use)
reads, for tasks enqueued and processed by Go."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scheduler import PeriodicTask, Scheduler
from tests.cli.conftest import aqsh, cli_env
from tests.interop.harness import go, go_background
from tests.support import wait_until

COUNTS = ("size", "pending", "active", "scheduled", "retry", "archived", "completed",
          "aggregating", "processed", "failed", "processed_total", "failed_total", "paused")

#: What the v0.24.1 harness reports of a queue.
OLD_COUNTS = ("size", "pending", "active", "scheduled")


def admin(redis_url: str, *args: str) -> Any:
    result = aqsh("admin", "--redis", redis_url, *args, "--json", env=cli_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _task_view(task: dict[str, Any], *, go_side: bool) -> tuple[Any, ...]:
    """The fields both sides report, in one shape (Go says 0 where aqsh says null)."""
    def zero(value: Any) -> Any:
        return value or 0

    return (task["id"], task["type"], task["payload"], task["state"], task["max_retry"],
            task["retried"], task["last_err"] if go_side else (task["last_error"] or ""),
            zero(task["last_failed_at"]), task["timeout_s"], zero(task["deadline"]),
            task["group"] or "", task["retention_s"], zero(task["completed_at"]),
            task["result"] or "", task["is_orphaned"])


async def test_admin_figures_equal_the_go_inspectors(
    redis: aioredis.Redis, redis_url: str
) -> None:
    specs = [
        {"type": "ok:pending", "payload": "p", "headers": {"h": "1"}},
        {"type": "ok:later", "payload": "s", "process_in_s": 600, "max_retry": 4},
        {"type": "ok:grouped", "payload": "g", "group": "batch"},
        {"type": "fail:once", "payload": "f", "queue": "work", "max_retry": 0},
        {"type": "result:kept", "payload": "k", "queue": "work", "retention_s": 3600,
         "timeout_s": 30},
        {"type": "ok:gone", "payload": "o", "queue": "work"},
        {"type": "ok:retry", "payload": "r", "queue": "retryq", "deadline_s": 4102444800},
        {"type": "ok:active", "payload": "a", "queue": "activeq"},
    ]
    enqueued = go("enqueue", redis_url, stdin=specs)
    assert all("id" in r for r in enqueued), enqueued
    # Go processes the "work" queue: one archived, one completed, one done and deleted.
    go("serve", redis_url, "-queues", "work:1", "-duration", "3s")
    # aqsh's broker leases two Go tasks: one stays active, one fails into retry.
    broker = RedisBroker(redis)
    now = int(time.time())
    retry_lease = await broker.dequeue(["retryq"], now_s=now)
    assert retry_lease is not None
    await broker.retry(retry_lease.message, retry_at_s=now + 900, error_msg="boom",
                       is_failure=True, now_s=now)
    assert await broker.dequeue(["activeq"], now_s=now) is not None

    mine = {q["queue"]: q for q in admin(redis_url, "queues")}
    assert set(mine) == set(go("queues", redis_url))
    for name, shown in mine.items():
        theirs = go("queue-info", redis_url, "-queue", name)
        assert {k: shown[k] for k in COUNTS} == {k: theirs[k] for k in COUNTS}, name
        assert shown["memory_usage_bytes"] == theirs["memory"], name
        assert abs(shown["latency_s"] - theirs["latency_s"]) < 5, name
        # Asynqmon pins asynq v0.24.1: its Inspector gives the same counts.
        old = go("queue-info", redis_url, "-queue", name, binary="aqsh-interop-v0241")
        assert {k: shown[k] for k in OLD_COUNTS} == {k: old[k] for k in OLD_COUNTS}, name
        assert shown["memory_usage_bytes"] == old["memory"], name
    assert (mine["work"]["archived"], mine["work"]["completed"], mine["work"]["processed"],
            mine["work"]["failed"]) == (1, 1, 3, 1)

    compared = 0
    for name, states in {"default": ("pending", "scheduled"),
                         "work": ("archived", "completed", "pending"),
                         "retryq": ("retry",), "activeq": ("active",)}.items():
        for state in states:
            shown = admin(redis_url, "tasks", "ls", "--queue", name, "--state", state)
            theirs = go("list", redis_url, "-queue", name, "-state", state)
            assert [_task_view(t, go_side=False) for t in shown] == [
                _task_view(t, go_side=True) for t in theirs], (name, state)
            compared += len(theirs)
            for mine_task, their_task in zip(shown, theirs, strict=True):
                if state in ("scheduled", "retry"):
                    assert mine_task["next_process_at"] == their_task["next_process_at"]
    assert compared == 6  # one task in each state listed
    one = enqueued[0]["id"]
    inspected = admin(redis_url, "task", "inspect", one)
    theirs_one = go("inspect", redis_url, "-queue", "default", "-id", one)
    assert _task_view(inspected, go_side=False) == _task_view(theirs_one, go_side=True)
    assert inspected["headers"] == theirs_one["headers"] == {"h": "1"}

    # Mutations through the admin commands are what the Go Inspector sees.
    assert aqsh("admin", "--redis", redis_url, "queue", "pause", "default",
                env=cli_env()).returncode == 0
    assert go("queue-info", redis_url, "-queue", "default")["paused"] is True
    later = enqueued[1]["id"]
    assert aqsh("admin", "--redis", redis_url, "task", "run", later,
                env=cli_env()).returncode == 0
    assert go("inspect", redis_url, "-queue", "default", "-id", later)["state"] == "pending"


async def test_admin_servers_and_cron_equal_the_go_inspectors(
    redis: aioredis.Redis, redis_url: str
) -> None:
    server = go_background("serve", redis_url, "-queues", "idle:3,other:1", "-concurrency",
                           "3", "-duration", "60s")
    try:
        await wait_until(lambda: go("servers", redis_url), timeout_s=30, interval_s=0.3,
                         message="go server announced")
        theirs = go("servers", redis_url)
        mine = admin(redis_url, "servers")
        fields = ("id", "host", "pid", "concurrency", "queues", "strict", "status", "started")
        assert [{k: s[k] for k in fields} for s in mine] == [
            {k: s[k] for k in fields} for s in theirs]
        assert mine[0]["queues"] == {"idle": 3, "other": 1}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    clock = ManualClock(float(int(time.time())))
    sched = Scheduler(RedisBroker(redis), clock=clock)
    sched.register(PeriodicTask(spec="*/5 * * * *", type="ok:backup", payload=b"{}",
                                max_retry=2, timeout_s=1800))
    sched.register(PeriodicTask(spec="@daily", type="ok:report", payload=b"", queue="reports"))
    clock.advance(300)
    await sched.fire_due()
    await sched.heartbeat()
    theirs_cron = {e["id"]: e for e in go("cron", redis_url)}
    mine_cron = {e["id"]: e for e in admin(redis_url, "cron", "ls")}
    assert set(mine_cron) == set(theirs_cron)
    history = admin(redis_url, "cron", "history", *mine_cron)
    for entry_id, entry in mine_cron.items():
        their = theirs_cron[entry_id]
        assert (entry["spec"], entry["type"], entry["payload"], entry["options"],
                entry["next"]) == (their["spec"], their["type"], their["payload"],
                                   their["opts"], their["next"])
        assert entry["prev"] == (None if their["prev_zero"] else their["prev"])
        assert [(e["task_id"], e["enqueued_at"]) for e in history[entry_id]] == [
            (e["task_id"], e["at"]) for e in their["events"]]
