"""Stopping never re-runs finished work, and a draining process still answers its probes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.keys import log_key
from aqsh.engine.models import TaskMessage
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import free_port
from tests.api.conftest import write_tasks
from tests.support import wait_until_sync

Q = keys.queue_keys("default")
ROOT = Path(__file__).resolve().parents[2]


class GatedAcks(RedisBroker):
    """A real broker whose acknowledgements wait at a gate: the window between a handler's
    return and its ack, held open as long as the test needs."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def finish_successes(self, msgs: Sequence[TaskMessage], *, now_s: float,
                               results: Sequence[bytes | None] | None = None) -> list[Any]:
        self.waiting.set()
        await self.gate.wait()
        return await super().finish_successes(msgs, now_s=now_s, results=results)


async def test_shutdown_acknowledges_a_returned_run_instead_of_requeueing_it(
    redis: aioredis.Redis,
) -> None:
    runs: list[str] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        runs.append(task.id)
        return b"done"

    broker = GatedAcks(redis)
    server = Server(broker, handler, queues={"default": 1}, shutdown_timeout_s=0.1)
    await server.start()
    info = await Client(broker).enqueue("t", b"", queue="default", retention=3600)
    await asyncio.wait_for(broker.waiting.wait(), 10)  # returned; its ack is held
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.3)  # well past the 0.1 s drain: the run is still unacknowledged
    assert not stopping.done()
    broker.gate.set()
    await asyncio.wait_for(stopping, 15)
    assert await redis.zscore(Q.completed, info.id) is not None
    assert await redis.lrange(Q.pending, 0, -1) == []  # not requeued to run again
    assert runs == [info.id]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_probes_answer_while_draining(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM with a script running: until it has drained, live answers 200 and ready 503 —
    the listener stays open, so Kubernetes sees a drain, not a dead pod."""
    config, scripts = write_tasks(tmp_path)
    (scripts / "drain.sh").write_text('#!/bin/sh\necho started\nsleep 3\n')
    (scripts / "drain.sh").chmod(0o755)
    with config.open("a") as handle:
        handle.write("  drain:\n    script: drain.sh\n")
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(config),
           "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
           "AQSH_RESULTS_DIR": str(tmp_path / "work"), "AQSH_LOG_FORMAT": "json",
           "AQSH_SHUTDOWN_TIMEOUT": "20s", "AQSH_SCHEDULER": "false"}
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "both"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until_sync(lambda: _reachable(base + "/health/ready"), timeout_s=30,
                        message="service up")
        request = urllib.request.Request(base + "/tasks/drain", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            task_id = json.loads(resp.read())["id"]
        check = redis.Redis.from_url(redis_url)
        wait_until_sync(lambda: check.xlen(log_key(task_id)) >= 2, timeout_s=20,
                        message="script running")
        proc.send_signal(signal.SIGTERM)
        wait_until_sync(lambda: _get(base + "/health/ready")[0] == 503, timeout_s=10,
                        message="not ready while draining")
        live = _get(base + "/health/live")
        ready = _get(base + "/health/ready")
        assert proc.poll() is None  # still draining
        assert live == (200, {"status": "draining"})
        assert ready[1]["status"] == "draining"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with redis.Redis.from_url(redis_url) as check:
        state = check.hget(Q.task(task_id), "state")
        assert state in (b"completed", None)  # finished during the drain, not requeued
        assert check.lrange(Q.pending, 0, -1) == []


def _reachable(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False
