"""Issue-9 interop: an aqsh worker and a Go asynq server on one queue, and a task type only the Go
server handles. aqsh answers as a Go server without the handler would ("handler not found",
retried), so none is archived and the Go server processes every one in the end. (Before: aqsh
archived each one it fetched — 11 of 20 here.)"""

from __future__ import annotations

import signal
from pathlib import Path

import redis.asyncio as aioredis

from aqsh.config_holder import ConfigHolder
from aqsh.engine import keys, wire
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.runner.handler import RunnerSettings, ShellRunner
from tests.api.conftest import write_tasks
from tests.interop.harness import go, go_background, seen
from tests.support import wait_until

TASKS = 20


async def test_a_type_only_go_handles_is_retried_by_aqsh_until_go_runs_it(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config_path, scripts = write_tasks(tmp_path)
    config = ConfigHolder(str(config_path), str(scripts))
    assert "ok:go-only" not in config.current.tasks
    runner = ShellRunner(config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    # The test shortens the retry delay (production: asynq's 15-44 s for a first retry), so the
    # tasks come round again quickly; retries are forwarded by the Go server's forwarder alone
    # (every 5 s), and aqsh polls an idle queue once a second as Go does, so neither side wins
    # every round by being first to look (aqsh's own forwarder wakes its fetcher at once).
    server = Server(RedisBroker(redis), runner, concurrency=4, queues={"default": 1},
                    retry_delay=lambda n, e, t: 1.0, forward_interval_s=3600,
                    poll_interval_s=1.0, heartbeat_interval_s=1.0)
    q = keys.queue_keys("default")
    await server.start()
    go_server = None
    try:
        specs = [{"type": "ok:go-only", "payload": str(i), "retention_s": 600}
                 for i in range(TASKS)]
        ids = {r["id"] for r in go("enqueue", redis_url, stdin=specs)}
        # aqsh alone first: every task is fetched by it (and must survive that) ...
        await wait_until(lambda: _all_retried(redis, q, ids), timeout_s=60,
                         interval_s=0.2, message="aqsh turned every task down once")
        assert await redis.zcard(q.archived) == 0
        # ... then the Go server joins the queue and gets each one sooner or later.
        go_server = go_background("serve", redis_url, "-queues", "default:1",
                                  "-concurrency", "4", "-duration", "120s")
        await wait_until(lambda: _completed(redis, q, TASKS), timeout_s=90, interval_s=0.3,
                         message="every task completed by the Go server")
    finally:
        if go_server is not None:
            go_server.send_signal(signal.SIGTERM)
            go_server.wait(timeout=30)
        await server.stop(shutdown_timeout_s=1)
    info = go("queue-info", redis_url, "-queue", "default")
    assert (info["archived"], info["completed"]) == (0, TASKS)
    records = await seen(redis)
    assert {r["id"] for r in records} == ids
    assert {r["server"] for r in records} == {"go"}
    assert len(records) == TASKS  # each ran once, on the server that has the handler
    for task_id in ids:
        theirs = go("inspect", redis_url, "-queue", "default", "-id", task_id)
        assert theirs["state"] == "completed"
        assert theirs["retried"] >= 1  # went through aqsh at least once
        assert theirs["last_err"] == 'handler not found for task "ok:go-only"'


async def _all_retried(redis: aioredis.Redis, q: keys.QueueKeys, ids: set[str]) -> bool:
    for task_id in ids:
        raw = await redis.hget(q.task(task_id), "msg")
        if raw is None or wire.decode_task(raw).retried < 1:
            return False
    return True


async def _completed(redis: aioredis.Redis, q: keys.QueueKeys, count: int) -> bool:
    return bool(await redis.zcard(q.completed) >= count)
