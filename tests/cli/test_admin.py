"""``aqsh admin`` on a real Redis holding tasks in every state, run as a subprocess."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import (
    SchedulerEnqueueEvent,
    SchedulerEntry,
    ServerInfo,
    TaskState,
    WorkerInfo,
)
from aqsh.engine.rdb import RedisBroker
from tests.cli.conftest import aqsh, cli_env


def admin(redis_url: str, *args: str) -> Any:
    result = aqsh("admin", "--redis", redis_url, *args, "--json", env=cli_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def admin_plain(redis_url: str, *args: str) -> Any:
    return aqsh("admin", "--redis", redis_url, *args, env=cli_env())


async def _tasks_in_every_state(redis: aioredis.Redis) -> RedisBroker:
    broker = RedisBroker(redis)
    client = Client(broker)
    await client.enqueue("t:pending", b"p", task_id="p1")
    await client.enqueue("t:scheduled", b"s", task_id="s1", process_in=3600)
    for task_id in ("a1", "r1", "x1", "c1"):
        await client.enqueue(f"t:{task_id}", b"w", queue="work", task_id=task_id,
                             retention=3600 if task_id == "c1" else None)
    now = int(time.time())
    leased = {lease.message.id: lease.message
              for lease in await broker.dequeue_many(["work"], limit=4, now_s=now)}
    assert set(leased) == {"a1", "r1", "x1", "c1"}
    await broker.retry(leased["r1"], retry_at_s=now + 600, error_msg="boom", is_failure=True,
                       now_s=now)
    await broker.archive(leased["x1"], error_msg="gave up", now_s=now)
    await broker.mark_as_complete(leased["c1"], now_s=now)
    return broker


async def test_queue_figures_equal_the_inspectors(redis: aioredis.Redis, redis_url: str) -> None:
    await _tasks_in_every_state(redis)
    inspector = Inspector(redis)
    listed = {q["queue"]: q for q in admin(redis_url, "queues")}
    assert set(listed) == {"default", "work"}
    work = listed["work"]
    assert (work["pending"], work["active"], work["scheduled"], work["retry"],
            work["archived"], work["completed"], work["size"]) == (0, 1, 0, 1, 1, 1, 4)
    assert (listed["default"]["pending"], listed["default"]["scheduled"]) == (1, 1)
    for name, shown in listed.items():
        mine = await inspector.queue_info(name)
        for figure in ("size", "pending", "active", "scheduled", "retry", "archived",
                       "completed", "processed", "failed", "paused", "memory_usage_bytes"):
            assert shown[figure] == getattr(mine, figure), (name, figure)
    stats = admin(redis_url, "stats")
    assert stats["states"] == {"active": 1, "pending": 1, "aggregating": 0, "scheduled": 1,
                               "retry": 1, "archived": 1, "completed": 1}
    assert (stats["processed"], stats["failed"]) == (3, 2)  # retry and archive count failed
    assert stats["redis"]["version"]
    human = admin_plain(redis_url, "queues")
    assert human.returncode == 0
    assert "work" in human.stdout
    assert "ARCHIVED" in human.stdout
    inspected = admin(redis_url, "queue", "inspect", "work", "--days", "2")
    assert [day["processed"] for day in inspected["history"]] == [3, 0]
    for args, expected in ((("stats",), "Tasks by state"),
                           (("queue", "inspect", "work"), "Daily (UTC)")):
        shown = admin_plain(redis_url, *args)
        assert shown.returncode == 0, shown.stderr
        assert expected in shown.stdout


async def test_tasks_ls_in_each_state(redis: aioredis.Redis, redis_url: str) -> None:
    await _tasks_in_every_state(redis)
    expected = {("default", "pending"): ["p1"], ("default", "scheduled"): ["s1"],
                ("work", "active"): ["a1"], ("work", "retry"): ["r1"],
                ("work", "archived"): ["x1"], ("work", "completed"): ["c1"],
                ("work", "pending"): []}
    for (queue, state), ids in expected.items():
        shown = admin(redis_url, "tasks", "ls", "--queue", queue, "--state", state)
        assert [t["id"] for t in shown] == ids, (queue, state)
        assert all(t["state"] == state for t in shown)
    retry = admin(redis_url, "task", "inspect", "r1")
    assert (retry["queue"], retry["state"], retry["last_error"], retry["retried"]) == (
        "work", "retry", "boom", 1)
    assert retry["next_process_at"] > time.time()
    shown = admin_plain(redis_url, "task", "inspect", "r1")
    assert shown.returncode == 0, shown.stderr
    assert "boom" in shown.stdout
    assert "next process at" in shown.stdout
    human = admin_plain(redis_url, "tasks", "ls", "--queue", "work", "--state", "archived")
    assert "x1" in human.stdout
    assert "gave up" in human.stdout


async def test_task_and_queue_operations(redis: aioredis.Redis, redis_url: str) -> None:
    await _tasks_in_every_state(redis)
    inspector = Inspector(redis)
    assert admin_plain(redis_url, "task", "run", "s1").returncode == 0
    assert (await inspector.task_info("default", "s1")).state is TaskState.PENDING
    assert admin_plain(redis_url, "task", "archive", "p1", "--queue", "default").returncode == 0
    assert (await inspector.task_info("default", "p1")).state is TaskState.ARCHIVED
    assert admin_plain(redis_url, "task", "delete", "x1").returncode == 0
    assert admin(redis_url, "tasks", "ls", "--queue", "work", "--state", "archived") == []
    refused = admin_plain(redis_url, "task", "archive", "a1")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "aqsh: cannot archive task a1: it is active; cancel it instead"
    missing = admin_plain(redis_url, "task", "inspect", "nope")
    assert (missing.returncode, missing.stderr.strip()) == (1, "aqsh: task nope not found")

    assert admin_plain(redis_url, "queue", "pause", "work").returncode == 0
    assert (await inspector.queue_info("work")).paused
    again = admin_plain(redis_url, "queue", "pause", "work")
    assert (again.returncode, again.stderr.strip()) == (
        1, 'aqsh: queue "work" is already paused')
    assert admin_plain(redis_url, "queue", "unpause", "work").returncode == 0
    assert not (await inspector.queue_info("work")).paused

    pubsub = redis.pubsub()
    await pubsub.subscribe("asynq:cancel")
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    assert admin_plain(redis_url, "task", "cancel", "a1").returncode == 0
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
    assert message is not None
    assert message["data"] == b"a1"
    await pubsub.aclose()


async def test_bulk_operations_and_queue_removal(redis: aioredis.Redis, redis_url: str) -> None:
    await _tasks_in_every_state(redis)
    client = Client(RedisBroker(redis))
    for i in range(3):
        await client.enqueue("t:later", b"l", queue="bulk", task_id=f"b{i}", process_in=3600)
    archived = admin_plain(redis_url, "tasks", "archive-all", "--queue", "bulk",
                           "--state", "scheduled")
    assert (archived.returncode, archived.stdout.strip()) == (
        0, "3 scheduled task(s) of queue bulk archived")
    assert [t["id"] for t in admin(redis_url, "tasks", "ls", "--queue", "bulk", "--state",
                                   "archived")] == ["b0", "b1", "b2"]
    ran = admin_plain(redis_url, "tasks", "run-all", "--queue", "bulk", "--state", "archived")
    assert ran.stdout.strip() == "3 archived task(s) of queue bulk made pending"
    refused = admin_plain(redis_url, "queue", "remove", "bulk")
    assert (refused.returncode, refused.stderr.strip()) == (1, 'aqsh: queue "bulk" is not empty')
    deleted = admin_plain(redis_url, "tasks", "delete-all", "--queue", "bulk", "--state",
                          "pending")
    assert deleted.stdout.strip() == "3 pending task(s) of queue bulk deleted"
    assert admin_plain(redis_url, "queue", "remove", "bulk").returncode == 0
    assert "bulk" not in {q["queue"] for q in admin(redis_url, "queues")}
    busy = admin_plain(redis_url, "queue", "remove", "work", "--force")
    assert (busy.returncode, busy.stderr.strip()) == (
        1, 'aqsh: cannot remove queue "work" with active tasks')


async def test_servers_and_cron(redis: aioredis.Redis, redis_url: str) -> None:
    broker = RedisBroker(redis)
    now = int(time.time())
    info = ServerInfo(host="box", pid=42, server_id="srv-1", concurrency=5,
                      queues={"default": 1, "work": 2}, start_time_ns=now * 10**9)
    worker = WorkerInfo(host="box", pid=42, server_id="srv-1", task_id="a1", task_type="t:a",
                        task_payload=b"w", queue="work", start_time_ns=now * 10**9,
                        deadline_ns=(now + 60) * 10**9)
    await broker.write_server_state(info, [worker], ttl_s=30, now_s=now)
    servers = admin(redis_url, "servers")
    assert [(s["host"], s["pid"], s["id"], s["concurrency"], s["queues"]) for s in servers] == [
        ("box", 42, "srv-1", 5, {"default": 1, "work": 2})]
    assert [(w["task_id"], w["queue"], w["deadline"]) for w in servers[0]["workers"]] == [
        ("a1", "work", now + 60)]
    assert "srv-1" in admin_plain(redis_url, "servers").stdout

    entry = SchedulerEntry(id="e-1", spec="*/5 * * * *", task_type="t:cron",
                           task_payload=b"{}", enqueue_options=["Queue(\"default\")"],
                           next_enqueue_time_ns=(now + 300) * 10**9)
    await broker.write_scheduler_entries("sched-1", [entry], ttl_s=30, now_s=now)
    for i in range(3):
        await broker.record_scheduler_event(
            "e-1", SchedulerEnqueueEvent(task_id=f"fired-{i}",
                                         enqueue_time_ns=(now - 300 * (3 - i)) * 10**9),
            limit=1000)
    entries = admin(redis_url, "cron", "ls")
    assert [(e["id"], e["spec"], e["type"], e["next"], e["prev"]) for e in entries] == [
        ("e-1", "*/5 * * * *", "t:cron", now + 300, None)]
    assert "*/5 * * * *" in admin_plain(redis_url, "cron", "ls").stdout
    history = admin(redis_url, "cron", "history", "e-1")
    assert [e["task_id"] for e in history["e-1"]] == ["fired-2", "fired-1", "fired-0"]
    assert "fired-2" in admin_plain(redis_url, "cron", "history", "e-1").stdout


def test_unreachable_redis_is_one_line() -> None:
    result = aqsh("admin", "--redis", "redis://127.0.0.1:1/0", "queues", env=cli_env())
    assert result.returncode == 1
    assert result.stderr.startswith("aqsh: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_admin_command_and_group_has_examples_in_its_help() -> None:
    import click

    from aqsh.cli.admin import admin

    for name, command in admin.commands.items():
        result = aqsh("admin", name, "--help")
        assert result.returncode == 0, result.stderr
        assert f"aqsh admin {name}" in result.stdout.split("Examples:", 1)[-1], name
        if isinstance(command, click.Group):  # every sub-command is shown in its group's examples
            shown = result.stdout.split("Examples:", 1)[1]
            for sub in command.commands:
                assert f"aqsh admin {name} {sub}" in shown, (name, sub)
