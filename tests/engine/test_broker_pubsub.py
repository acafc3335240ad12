"""The broker's pub/sub: wake-ups from our own client, and cancellations surviving a dropped
subscriber connection."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from tests.support import wait_until


async def subscribers(redis: aioredis.Redis, channel: str) -> int:
    reply = await redis.execute_command("PUBSUB", "NUMSUB", channel)
    return int(reply[1])


async def test_an_enqueue_announces_its_queue_to_idle_workers(
    redis: aioredis.Redis, clock: ManualClock
) -> None:
    broker = RedisBroker(redis)
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def listen() -> None:
        async for qname in broker.wakeups():
            seen.put_nowait(qname)

    listener = asyncio.create_task(listen())
    await wait_until(lambda: subscribers(redis, keys.WAKE_CHANNEL), message="subscribed")
    client = Client(redis, clock=clock)
    await client.enqueue("email", b"1", queue="mail")  # first of a queue: registers it
    await client.enqueue("email", b"2", queue="mail")  # then the script publishes
    await client.enqueue("email", b"3", queue="later", process_in=60)  # scheduled: no wake-up
    assert [await asyncio.wait_for(seen.get(), 5) for _ in range(2)] == ["mail", "mail"]
    assert seen.empty()
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener


async def test_cancellations_resubscribe_after_the_connection_drops(
    redis: aioredis.Redis,
) -> None:
    broker = RedisBroker(redis)
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def listen() -> None:
        async for task_id in broker.cancellations():
            seen.put_nowait(task_id)

    listener = asyncio.create_task(listen())
    await wait_until(lambda: subscribers(redis, keys.CANCEL_CHANNEL), message="subscribed")
    await broker.publish_cancel("before")
    assert await asyncio.wait_for(seen.get(), 5) == "before"
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    async def delivered() -> bool:
        # Messages sent while no subscription exists are lost (pub/sub), so keep sending.
        await broker.publish_cancel("after")
        return not seen.empty()

    await wait_until(delivered, timeout_s=5, interval_s=0.05, message="resubscribed")
    assert seen.get_nowait() == "after"
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
