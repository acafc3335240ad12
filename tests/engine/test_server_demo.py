"""The standalone demo worker that interop tests and benchmarks start as a subprocess."""

from __future__ import annotations

import asyncio
import signal
import sys

import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.server_demo import parse_queues
from tests.support import wait_until


def test_parse_queues_takes_the_go_binary_form() -> None:
    assert parse_queues("critical:6, default:3,low") == {"critical": 6, "default": 3, "low": 1}


async def test_demo_worker_processes_tasks_and_clears_its_heartbeat_on_sigterm(
    redis: aioredis.Redis, redis_url: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqsh.engine.server_demo", "--redis", redis_url,
        "--queues", "demo:1", "--concurrency", "2",
    )
    try:
        await wait_until(lambda: redis.zcard(keys.ALL_SERVERS), message="heartbeat")
        info = await Client(redis).enqueue("echo", b"hello", queue="demo", retention=60)
        q = keys.queue_keys("demo")

        async def result() -> bytes | None:
            value: bytes | None = await redis.hget(q.task(info.id), "result")
            return value

        assert await wait_until(result, message="echo result") == b"hello"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert await redis.zcard(keys.ALL_SERVERS) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
