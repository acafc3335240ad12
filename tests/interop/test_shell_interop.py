"""Issue-4 interop: a task enqueued by a Go client with a bad payload is archived, never run."""

from __future__ import annotations

import json
from pathlib import Path

import redis.asyncio as aioredis

from aqsh.config_holder import ConfigHolder
from aqsh.engine import keys, wire
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.runner.handler import RunnerSettings, ShellRunner, shell_retry_delay
from tests.api.conftest import write_tasks
from tests.interop.harness import go
from tests.support import wait_until


async def test_go_enqueued_bad_payload_is_archived_without_running(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config_path, scripts = write_tasks(tmp_path)
    marker = tmp_path / "ran"
    (scripts / "echo.sh").write_text(f'#!/bin/sh\ntouch "{marker}"\necho "hello $NAME"\n')
    config = ConfigHolder(str(config_path), str(scripts))
    runner = ShellRunner(config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    server = Server(RedisBroker(redis), runner, queues={"default": 1},
                    retry_delay=shell_retry_delay(config))
    specs = [
        {"type": "echo", "payload": json.dumps({"name": "x; rm -rf /", "bogus": 1}),
         "max_retry": 5},
        {"type": "echo", "payload": "not json at all", "max_retry": 5},
        {"type": "echo", "payload": json.dumps({"name": "gopher"})},
    ]
    ids = [r["id"] for r in go("enqueue", redis_url, stdin=specs)]
    await server.start()
    q = keys.queue_keys("default")
    try:
        for bad in ids[:2]:
            await wait_until(lambda bad=bad: redis.zscore(q.archived, bad), message="archived")
        await wait_until(lambda: _gone(redis, q.task(ids[2])), message="good one ran and done")
    finally:
        await server.stop()
    for bad in ids[:2]:
        theirs = go("inspect", redis_url, "-queue", "default", "-id", bad)
        assert theirs["state"] == "archived"
        assert theirs["retried"] == 0  # never retried: it can never become valid
        assert theirs["last_err"].startswith("invalid payload")
        assert json.loads(theirs["result"])["exit_code"] == -1
    first_error = wire.decode_task(await redis.hget(q.task(ids[0]), "msg")).error_msg
    assert "pattern" in first_error
    assert "unknown_field" in first_error
    # Only the valid task touched the marker: the bad ones never ran.
    assert marker.exists()
    assert await redis.exists("logs:" + ids[0], "logs:" + ids[1]) == 0


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.exists(key) == 0)
