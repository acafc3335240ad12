"""The wake-up is a courtesy: a Redis user that may not publish on ``aqsh:wake`` (a Go asynq
deployment's ACL; any new Redis 7 user, whose default is ``resetchannels``) still enqueues with
every enqueue script, on both transports, and the client stops trying after one warning."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.connection import RedisSettings, create_client
from tests.acl.test_acl import GO_COMPATIBLE_ACL

USER = "go-compatible"


@pytest.fixture
async def user_client(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    await redis.execute_command("ACL", "SETUSER", USER, "reset", "on", ">pw",
                                *GO_COMPATIBLE_ACL.split())
    await redis.execute_command("ACL", "LOG", "RESET")
    client = create_client(RedisSettings(url=redis_url.replace("redis://", f"redis://{USER}:pw@")))
    try:
        yield client
    finally:
        await client.aclose()
        await redis.execute_command("ACL", "DELUSER", USER)


async def wake_refusals(redis: aioredis.Redis) -> int:
    """How many PUBLISHes on aqsh:wake Redis refused (the ACL LOG counts repeats)."""
    entries = await redis.execute_command("ACL", "LOG")
    return sum(int(e[b"count"]) for e in entries if e[b"object"] == keys.WAKE_CHANNEL.encode())


@pytest.mark.parametrize("fast_lane", [False, True])
@pytest.mark.parametrize("how", ["enqueue", "unique", "batch"])
async def test_enqueue_succeeds_when_the_wake_up_is_refused(
    redis: aioredis.Redis, user_client: aioredis.Redis, fast_lane: bool, how: str,
) -> None:
    pending = keys.queue_keys("default").pending
    async with Client(user_client, fast_lane=fast_lane) as client:
        with capture_logs() as logs:
            for n in range(3):
                if how == "enqueue":
                    ids = [(await client.enqueue("t", b"%d" % n)).id]
                elif how == "unique":
                    ids = [(await client.enqueue("t", b"%d" % n, unique_ttl=60)).id]
                else:
                    results = await client.enqueue_many(
                        [EnqueueRequest(type="t", payload=b"%d-%d" % (n, i)) for i in range(3)]
                        + [EnqueueRequest(type="u", payload=b"%d" % n, unique_ttl=60)])
                    ids = [r.id for r in results if not isinstance(r, Exception)]
                    assert len(ids) == 4, results
                for task_id in ids:
                    state = await redis.hget(keys.queue_keys("default").task(task_id), "state")
                    assert state == b"pending"
    assert await redis.llen(pending) == (3 if how != "batch" else 12)
    warnings = [e for e in logs if e["event"] == "wakeup.refused"]
    assert len(warnings) == 1, logs
    assert warnings[0]["log_level"] == "warning"
    # Refused once, inside the first enqueue: the client sent no wake-up after that.
    assert await wake_refusals(redis) == 1


async def test_a_user_with_the_channel_still_wakes_workers(
    redis: aioredis.Redis, redis_url: str,
) -> None:
    """The pcall keeps the wake-up where it is allowed: a subscriber hears the queue name."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.WAKE_CHANNEL)
    try:
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
        async with Client(redis) as client:
            with capture_logs() as logs:
                await client.enqueue("t", b"x", queue="woken")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
        assert message is not None
        assert message["data"] == b"woken"
        assert [e for e in logs if e["event"] == "wakeup.refused"] == []
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
