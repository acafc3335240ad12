"""A loop's nap must never swallow the cancellation that stops it, nor nap on after a library
swallowed it.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the event is set in
the same pass of the event loop as the task is cancelled: the loop naps on and whoever awaits
the cancelled task waits for ever. Seen in the suite as a scheduler that kept firing for two
minutes after its ``stop()`` (which cancels it) began."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from aqsh.clock import wait_event
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scheduler import PeriodicTask, Scheduler


async def test_a_cancel_arriving_as_the_event_is_set_ends_the_nap() -> None:
    event = asyncio.Event()
    naps = 0

    async def loop() -> None:
        nonlocal naps
        while True:
            await wait_event(event, 30)
            event.clear()
            naps += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # napping
    event.set()
    task.cancel()  # same pass of the event loop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


async def test_wait_event_reports_set_and_timeout() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True


async def test_a_scheduler_stopped_as_its_entries_change_stops(redis: aioredis.Redis) -> None:
    scheduler = Scheduler(RedisBroker(redis))
    await scheduler.start()
    await asyncio.sleep(0.05)  # napping until its next fire or heartbeat
    scheduler.register(PeriodicTask(spec="@every 1h", type="t", payload=b"", queue="q"))
    stopping = asyncio.create_task(scheduler.stop())  # cancels it as it wakes to announce
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, "the scheduler went on after its stop() cancelled it"


async def test_a_cancel_that_redis_py_swallows_still_ends_the_loop(
    redis: aioredis.Redis,
) -> None:
    """redis-py 8 may return normally from a command whose task was cancelled meanwhile; the
    loop's next nap must notice the pending cancellation."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            for _ in range(50):
                await redis.set("k", "v")
            await wait_event(event, 30)

    task = asyncio.create_task(loop())
    for _ in range(2):
        await asyncio.sleep(0)
    task.cancel()  # lands inside a Redis command
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done
    assert task.cancelled()
