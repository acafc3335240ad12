"""A task type that is not in tasks.yaml, on a queue shared with Go servers: retried with asynq's
back-off and the error a Go server gives ("handler not found for task ..."), so the server that
has the handler gets it later; ``unknown_tasks="archive"`` keeps the old archive-at-once."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.engine import keys, wire
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import SkipRetry
from aqsh.errors import ConfigError
from aqsh.runner.handler import (
    HandlerNotFound,
    RunnerSettings,
    ShellRunner,
    go_quote,
    shell_retry_delay,
)
from aqsh.runner.spec import TasksConfig
from aqsh.settings import load_settings
from tests.runner.test_runner import Ctx, task
from tests.support import wait_until


def test_the_error_text_is_asynqs_own() -> None:
    # servemux.go: fmt.Errorf("%w %q", ErrHandlerNotFound, task.Type()), with
    # ErrHandlerNotFound = errors.New("handler not found for task").
    assert go_quote("email:welcome") == '"email:welcome"'
    assert go_quote('a"b\\c\n\t\x01\x7f') == '"a\\"b\\\\c\\n\\t\\x01\\x7f"'
    assert go_quote("日本 é") == '"日本 é"'
    assert go_quote("\u200b") == '"\\u200b"'


async def test_an_unknown_type_is_retried_with_asynqs_backoff_and_not_given_a_result(
    redis: aioredis.Redis, tmp_path: Path, clock: ManualClock
) -> None:
    config = TasksConfig(path="t", tasks={})
    runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    server = Server(RedisBroker(redis), runner, clock=clock, queues={"default": 1},
                    retry_delay=shell_retry_delay(lambda: config), forward_interval_s=3600,
                    recover_interval_s=3600, heartbeat_interval_s=3600)
    await server.start()
    q = keys.queue_keys("default")
    try:
        info = await Client(redis, clock=clock).enqueue("go:only", b"{}", max_retry=25)
        score = await wait_until(lambda: redis.zscore(q.retry, info.id), message="retry")
    finally:
        await server.stop(shutdown_timeout_s=0)
    # asynq's default delay for a first retry: 0**4 + 15 + rand(0..29) * 1 seconds.
    assert 15 <= score - int(clock.now_s()) <= 44
    h = await redis.hgetall(q.task(info.id))
    message = wire.decode_task(h[b"msg"])
    assert message.error_msg == 'handler not found for task "go:only"'
    assert message.retried == 1
    assert b"result" not in h  # the task may be another server's; its result is theirs
    assert await redis.zscore(q.archived, info.id) is None


async def test_archive_mode_archives_an_unknown_type_at_once(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={}), redis,
                         RunnerSettings(work_root=str(tmp_path / "w"), unknown_tasks="archive"))
    with pytest.raises(SkipRetry, match="no script is configured for task 'nope'"):
        await runner(task("nope"), Ctx("t1"))
    retrying = ShellRunner(lambda: TasksConfig(path="t", tasks={}), redis,
                           RunnerSettings(work_root=str(tmp_path / "w")))
    ctx = Ctx("t2")
    with pytest.raises(HandlerNotFound, match='handler not found for task "nope"'):
        await retrying(task("nope", task_id="t2"), ctx)
    assert ctx.result_writer.written == []


def test_the_setting() -> None:
    assert load_settings({}).unknown_tasks == "retry"
    assert load_settings({"AQSH_UNKNOWN_TASKS": "archive"}).unknown_tasks == "archive"
    with pytest.raises(ConfigError, match="AQSH_UNKNOWN_TASKS='drop' is not valid: expected "
                                          "retry or archive"):
        load_settings({"AQSH_UNKNOWN_TASKS": "drop"})
