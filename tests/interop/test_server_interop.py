"""Issue-3 interop: an aqsh Server side by side with the real Go asynq library."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.clock import ManualClock, SystemClock
from aqsh.engine import keys
from aqsh.engine.maintenance import Recoverer
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from tests.interop.harness import ROOT, InteropHandler, go, go_background, seen
from tests.support import wait_until


@pytest.fixture
async def aqsh_server(redis: aioredis.Redis) -> AsyncIterator[Server]:
    server = Server(RedisBroker(redis), InteropHandler(redis), concurrency=4,
                    queues={"default": 1}, retry_delay=lambda n, e, t: 1.0,
                    forward_interval_s=0.5, heartbeat_interval_s=1.0)
    await server.start()
    yield server
    await server.stop(shutdown_timeout_s=1)


async def test_go_enqueued_tasks_processed_by_aqsh_as_go_would(
    redis: aioredis.Redis, redis_url: str, aqsh_server: Server
) -> None:
    specs: list[dict[str, Any]] = [
        {"type": "ok:now", "payload": "a", "headers": {"k": "v"}},
        {"type": "ok:sched", "payload": "b", "process_in_s": 1},
        {"type": "fail:twice", "payload": "c", "max_retry": 1},
        {"type": "ok:uniq", "payload": "d", "unique_s": 300},
        {"type": "ok:deadline", "payload": "e", "deadline_s": 4102444800},
        {"type": "result:kept", "payload": "f", "retention_s": 600, "task_id": "kept"},
        {"type": "skip:bad", "payload": "g", "max_retry": 5},
    ]
    ids = [r["id"] for r in go("enqueue", redis_url, stdin=specs)]

    async def settled() -> bool:
        info = go("queue-info", redis_url, "-queue", "default")
        return bool(info["pending"] == info["active"] == info["scheduled"] == info["retry"] == 0
                    and info["archived"] == 2)

    await wait_until(settled, timeout_s=30, interval_s=0.3, message="all tasks settled")
    info = go("queue-info", redis_url, "-queue", "default")
    # 5 successes + fail (2 attempts) + skip (1 attempt) = 8 processed, 3 failed.
    assert (info["processed"], info["failed"], info["completed"]) == (8, 3, 1)
    archived = {t["id"]: t for t in go("list", redis_url, "-queue", "default", "-state",
                                       "archived")}
    assert archived[ids[2]]["retried"] == 1
    assert archived[ids[2]]["last_err"] == "RuntimeError: aqsh handler failed"
    assert archived[ids[6]]["retried"] == 0
    kept = go("inspect", redis_url, "-queue", "default", "-id", "kept")
    assert (kept["state"], kept["result"]) == ("completed", "aqsh-result:f")
    assert kept["completed_at"] > 0
    assert await redis.exists(keys.queue_keys("default").unique("ok:uniq", b"d")) == 0
    records = await seen(redis)
    assert collections.Counter(r["id"] for r in records)[ids[2]] == 2
    first = next(r for r in records if r["id"] == ids[0])
    assert first["headers"] == {"k": "v"}


async def test_go_inspector_sees_aqsh_server_and_cancels_its_handler(
    redis: aioredis.Redis, redis_url: str, aqsh_server: Server
) -> None:
    handler = aqsh_server.processor.handler
    assert isinstance(handler, InteropHandler)
    task_id = go("enqueue", redis_url, stdin=[{"type": "sleep:60000", "payload": "long",
                                                 "max_retry": 0}])[0]["id"]
    await wait_until(lambda: task_id in handler.started, message="handler started")

    def listed() -> list[dict[str, Any]]:
        servers = go("servers", redis_url)
        return [s for s in servers if s["workers"]]

    await wait_until(listed, timeout_s=10, interval_s=0.3, message="server with worker listed")
    server = listed()[0]
    assert (server["id"], server["pid"], server["concurrency"], server["status"]) == (
        aqsh_server.server_id, os.getpid(), 4, "active")
    assert server["queues"] == {"default": 1}
    assert [(w["task_id"], w["type"], w["payload"]) for w in server["workers"]] == [
        (task_id, "sleep:60000", "long")]
    assert go("mutate", redis_url, "-op", "cancel", "-id", task_id) == {"ok": True}
    await wait_until(lambda: redis.zscore(keys.queue_keys("default").archived, task_id),
                     timeout_s=10, message="cancelled task archived (max_retry 0)")
    theirs = go("inspect", redis_url, "-queue", "default", "-id", task_id)
    assert theirs["last_err"] == "context canceled"


async def test_aqsh_and_go_servers_share_a_queue_without_stealing(
    redis: aioredis.Redis, redis_url: str, aqsh_server: Server
) -> None:
    # 104 tasks of 2.5 s on 8 workers in all: a little over 30 s of shared work.
    specs = [{"type": "sleep:2500", "payload": str(i)} for i in range(104)]
    ids = {r["id"] for r in go("enqueue", redis_url, stdin=specs)}
    go_server = go_background("serve", redis_url, "-queues", "default:1", "-concurrency", "4",
                              "-duration", "40s")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await wait_until(lambda: _count(redis, len(ids) // 2), timeout_s=60, interval_s=0.5,
                         message="half the tasks seen")
        # A late Go server runs its recoverer at start, mid-way through the shared work.
        late = go_background("serve", redis_url, "-queues", "default:1", "-concurrency", "1",
                             "-duration", "1s")
        await wait_until(lambda: _count(redis, len(ids)), timeout_s=90, interval_s=0.5,
                         message="every task seen")
        late.wait(timeout=30)
    finally:
        go_server.send_signal(signal.SIGTERM)
        go_server.wait(timeout=30)
    assert loop.time() - started >= 30
    records = await seen(redis)
    counts = collections.Counter(r["id"] for r in records)
    assert set(counts) == ids
    assert max(counts.values()) == 1  # every task exactly once
    servers = {r["server"] for r in records}
    assert servers == {"aqsh", "go"}
    q = keys.queue_keys("default")
    assert await redis.llen(q.active) == 0
    assert await redis.get(q.processed_total) == b"104"


async def _count(redis: aioredis.Redis, expected: int) -> bool:
    return bool(await redis.llen("interop:seen") >= expected)


async def test_killed_worker_task_is_recovered_and_completes(
    redis: aioredis.Redis, redis_url: str
) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "tests.interop.worker", redis_url, "default"],
                              cwd=ROOT)
    try:
        task_id = go("enqueue", redis_url,
                     stdin=[{"type": "slowfirst:600000", "payload": "x"}])[0]["id"]
        q = keys.queue_keys("default")
        await wait_until(lambda: redis.zscore(q.lease, task_id), timeout_s=15,
                         message="worker leased the task")
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert await redis.lrange(q.active, 0, -1) == [task_id.encode()]
    # The lease is abandoned: once it is 30 s past, any recoverer takes the task back. Time for
    # the recoverer is the writer's clock (asynq's rule), so it runs a minute in the future.
    later = ManualClock(SystemClock().now_s() + 61)
    broker = RedisBroker(redis)
    recoverer = Recoverer(broker, ["default"], later, retry_delay=lambda n, e, t: 0.0)
    assert await recoverer.run_once() == 1
    theirs = go("inspect", redis_url, "-queue", "default", "-id", task_id)
    assert (theirs["state"], theirs["last_err"], theirs["retried"]) == (
        "retry", "asynq: task lease expired", 1)
    assert await broker.forward_if_ready(["default"], now_ns=later.now_ns()) == 1
    # The retry attempt of a "slowfirst" task is quick: a fresh server completes it.
    server = Server(broker, InteropHandler(redis), queues={"default": 1})
    await server.start()
    try:
        await wait_until(lambda: _gone(redis, q.task(task_id)), message="completed")
    finally:
        await server.stop()
    assert await redis.llen(q.active) == 0
    assert await redis.zcard(q.lease) == 0


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.exists(key) == 0)
