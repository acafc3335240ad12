"""Issue-2 interop: aqsh's Client/Inspector against the real Go asynq Client, Inspector, Server."""

from __future__ import annotations

import base64

import redis.asyncio as aioredis

from aqsh.clock import SystemClock
from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from tests.interop.harness import go, seen


async def test_aqsh_enqueued_tasks_are_read_and_processed_by_go(
    redis: aioredis.Redis, redis_url: str
) -> None:
    client = Client(redis)
    plain = await client.enqueue("ok:plain", b"hello", headers={"h": "1"})
    scheduled = await client.enqueue("ok:later", b"s", process_in=3600, max_retry=4)
    unique = await client.enqueue("ok:unique", b"u", unique_ttl=300)
    kept = await client.enqueue("result:kept", b"k", retention=3600, task_id="kept-id",
                                timeout=45)

    info = go("inspect", redis_url, "-queue", "default", "-id", plain.id)
    assert (info["type"], info["payload"], info["headers"], info["state"], info["max_retry"],
            info["timeout_s"]) == ("ok:plain", "hello", {"h": "1"}, "pending", 25, 1800)
    later = go("inspect", redis_url, "-queue", "default", "-id", scheduled.id)
    assert (later["state"], later["max_retry"], later["next_process_at"]) == (
        "scheduled", 4, scheduled.next_process_at_s)
    listed = {t["id"] for t in go("list", redis_url, "-queue", "default", "-state", "pending")}
    assert listed == {plain.id, unique.id, kept.id}
    lock = keys.queue_keys("default").unique("ok:unique", b"u")
    assert await redis.get(lock) == unique.id.encode()

    go("serve", redis_url, "-queues", "default:1", "-duration", "4s")
    records = {r["id"]: r for r in await seen(redis)}
    assert set(records) == {plain.id, unique.id, kept.id}
    assert (records[plain.id]["type"], records[plain.id]["payload"],
            records[plain.id]["headers"]) == ("ok:plain", "hello", {"h": "1"})
    done = go("inspect", redis_url, "-queue", "default", "-id", "kept-id")
    assert (done["state"], done["result"], done["retention_s"]) == (
        "completed", "go-result:k", 3600)
    assert await redis.exists(lock) == 0  # released on success
    gone = go("inspect", redis_url, "-queue", "default", "-id", plain.id)
    assert "not found" in gone["error"]
    stats = go("queue-info", redis_url, "-queue", "default")
    assert (stats["processed"], stats["failed"], stats["scheduled"], stats["completed"]) == (
        3, 0, 1, 1)


async def test_go_enqueued_tasks_read_identically_by_aqsh(
    redis: aioredis.Redis, redis_url: str
) -> None:
    specs = [
        {"type": "ok:plain", "payload": "p", "headers": {"x": "y"}},
        {"type": "ok:sched", "payload": "s", "process_in_s": 600, "queue": "q2"},
        {"type": "ok:uniq", "payload": "u", "unique_s": 120, "max_retry": 2},
        {"type": "ok:ret", "payload": "r", "retention_s": 60, "task_id": "go-id",
         "timeout_s": 30, "deadline_s": 4102444800},
        {"type": "ok:grp", "payload": "g", "group": "batch"},
    ]
    results = go("enqueue", redis_url, stdin=specs)
    assert all("id" in r for r in results), results
    inspector = Inspector(redis, clock=SystemClock())
    for spec, result in zip(specs, results, strict=True):
        mine = await inspector.find_task(result["id"])
        theirs = go("inspect", redis_url, "-queue", result["queue"], "-id", result["id"])
        assert mine.state.value == theirs["state"]
        assert mine.type == theirs["type"] == spec["type"]
        assert mine.message.payload == base64.b64decode(theirs["payload_b64"])
        assert (mine.message.headers or None) == theirs["headers"]
        assert mine.message.retry == theirs["max_retry"]
        assert mine.message.timeout_s == theirs["timeout_s"]
        assert mine.message.deadline_s == theirs["deadline"]
        assert mine.message.retention_s == theirs["retention_s"]
        assert mine.message.group_key == theirs["group"]
        assert mine.next_process_at_s == theirs["next_process_at"] or mine.state in (
            TaskState.PENDING, TaskState.AGGREGATING)
    q2 = await inspector.queue_info("q2")
    theirs_q2 = go("queue-info", redis_url, "-queue", "q2")
    assert (q2.size, q2.scheduled) == (theirs_q2["size"], theirs_q2["scheduled"])
    default = await inspector.queue_info("default")
    theirs_default = go("queue-info", redis_url, "-queue", "default")
    mine_default = (default.size, default.pending, default.aggregating,
                    default.memory_usage_bytes)
    assert mine_default == (theirs_default["size"], theirs_default["pending"],
                            theirs_default["aggregating"], theirs_default["memory"])

    # aqsh mutations are what the Go Inspector sees.
    plain_id, sched_id, uniq_id = results[0]["id"], results[1]["id"], results[2]["id"]
    await inspector.archive_task("default", plain_id)
    assert go("inspect", redis_url, "-queue", "default", "-id", plain_id)["state"] == "archived"
    await inspector.run_task("q2", sched_id)
    assert go("inspect", redis_url, "-queue", "q2", "-id", sched_id)["state"] == "pending"
    await inspector.delete_task("default", uniq_id)
    assert "not found" in go("inspect", redis_url, "-queue", "default", "-id", uniq_id)["error"]
    lock = keys.queue_keys("default").unique("ok:uniq", b"u")
    assert await redis.exists(lock) == 0  # the Go client's lock, released by our delete
    await inspector.pause_queue("default")
    assert go("queue-info", redis_url, "-queue", "default")["paused"] is True
    assert "already paused" in go("mutate", redis_url, "-op", "pause", "-queue", "default")[
        "error"]
    # And Go mutations are what aqsh sees.
    assert go("mutate", redis_url, "-op", "run", "-queue", "default", "-id", plain_id) == {
        "ok": True}
    assert (await inspector.task_info("default", plain_id)).state is TaskState.PENDING


async def test_go_inspector_v0241_reads_aqsh_layout(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Asynqmon pins asynq v0.24.1; its Inspector must read what aqsh writes."""
    client = Client(redis)
    await client.enqueue("ok:a", b"x", task_id="v24-a")
    await client.enqueue("ok:b", b"y", process_in=60, task_id="v24-b")
    info = go("queue-info", redis_url, "-queue", "default", binary="aqsh-interop-v0241")
    listed = go("list", redis_url, "-queue", "default", "-state", "scheduled",
                binary="aqsh-interop-v0241")
    assert [t["id"] for t in listed] == ["v24-b"]
    assert (info["pending"], info["scheduled"], info["size"]) == (1, 1, 2)
    assert info["memory"] > 0


async def test_golden_python_bytes_decode_in_go(redis: aioredis.Redis, redis_url: str) -> None:
    """Bytes aqsh encodes (every field, incl. unknown ones kept) are what Go decodes."""
    client = Client(redis)
    info = await client.enqueue("ok:all", b"\x00\xffbin", queue="gold", max_retry=9,
                                timeout=77, retention=88, task_id="py-gold",
                                headers={"ü": "ß"}, unique_ttl=99)
    theirs = go("inspect", redis_url, "-queue", "gold", "-id", info.id)
    assert base64.b64decode(theirs["payload_b64"]) == b"\x00\xffbin"
    assert (theirs["max_retry"], theirs["timeout_s"], theirs["retention_s"], theirs["headers"]) == (
        9, 77, 88, {"ü": "ß"})
