import redis.asyncio as aioredis

from aqsh.engine.keys import queue_keys


async def test_private_redis_is_reachable_and_empty(redis: aioredis.Redis) -> None:
    assert await redis.dbsize() == 0
    await redis.set(queue_keys("default").paused, 1)
    assert await redis.exists("asynq:{default}:paused") == 1
