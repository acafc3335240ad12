"""Process-level shutdown through real signals, and the handler registry's routing rules."""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Middleware, ServeMux, Server
from aqsh.engine.task import CancelReason, Handler, Task, TaskContext
from tests.support import wait_until

Q = keys.queue_keys("default")


async def test_second_sigterm_forces_shutdown_and_requeues(redis: aioredis.Redis) -> None:
    started = asyncio.Event()
    reasons: list[CancelReason | None] = []

    async def stubborn(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            reasons.append(ctx.cancel_reason)
        return None

    server = Server(RedisBroker(redis), stubborn, queues={"default": 1},
                    shutdown_timeout_s=600, heartbeat_interval_s=3600)
    runner = asyncio.create_task(server.run())
    info = await Client(redis).enqueue("stubborn", b"")
    await asyncio.wait_for(started.wait(), 5)

    os.kill(os.getpid(), signal.SIGTERM)
    await wait_until(lambda: server.heartbeater.status == "closed", message="draining")
    assert not runner.done()  # the first signal only drains; the handler still runs

    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 10)
    assert reasons == [CancelReason.SHUTDOWN]
    assert await redis.lrange(Q.pending, 0, -1) == [info.id.encode()]
    assert await redis.llen(Q.active) == 0
    assert await redis.zcard(keys.ALL_SERVERS) == 0


def _named(name: str) -> Handler:
    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return name.encode()

    return handler


async def test_mux_prefers_exact_then_longest_prefix_and_applies_middleware() -> None:
    mux = ServeMux()
    mux.handle("email:", _named("email"))
    mux.handle("email:welcome:", _named("welcome"))
    mux.handle("email:welcome:v2", _named("exact"))
    order: list[str] = []

    def tag(label: str) -> Middleware:
        def middleware(inner: Handler) -> Handler:
            async def wrapped(task: Task, ctx: TaskContext) -> bytes | None:
                order.append(label)
                return await inner(task, ctx)

            return wrapped

        return middleware

    mux.use(tag("outer"))
    mux.use(tag("inner"))

    def task(type_: str) -> Task:
        return Task(id="t", type=type_, payload=b"", queue="default")

    ctx: TaskContext = None  # type: ignore[assignment]  # routing never touches it
    assert await mux(task("email:welcome:v2"), ctx) == b"exact"
    assert await mux(task("email:welcome:v3"), ctx) == b"welcome"
    assert await mux(task("email:bye"), ctx) == b"email"
    assert order == ["outer", "inner"] * 3
    assert mux.resolve("sms:x") is None
