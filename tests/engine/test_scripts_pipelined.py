"""Pipelined transitions: lease extension for several queues in one round trip, asserted on the
raw lease zsets."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.engine import keys
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.rdb import RedisBroker

A, B = keys.queue_keys("a"), keys.queue_keys("b")


async def test_extend_leases_many_extends_every_queue_and_reports_lost_ids(
    redis: aioredis.Redis,
) -> None:
    await redis.zadd(A.lease, {"a1": 100, "a2": 100})
    await redis.zadd(B.lease, {"b1": 100})
    broker = RedisBroker(redis)
    expires_s, lost = await broker.extend_leases_many(
        {"a": ["a1", "a2", "a-gone"], "b": ["b1"], "empty": []}, now_s=200)
    assert expires_s == 200 + LEASE_DURATION_S
    assert lost == {"a": ["a-gone"], "b": []}
    assert await redis.zrange(A.lease, 0, -1, withscores=True) == [(b"a1", 230), (b"a2", 230)]
    assert await redis.zrange(B.lease, 0, -1, withscores=True) == [(b"b1", 230)]
    assert await broker.extend_leases_many({}, now_s=200) == (230, {})


async def test_extend_leases_many_raises_instead_of_guessing_on_an_error_reply(
    redis: aioredis.Redis,
) -> None:
    await redis.zadd(A.lease, {"a1": 100})
    await redis.set(B.lease, "not a zset")
    with pytest.raises(errors.AqshError, match="'b'"):
        await RedisBroker(redis).extend_leases_many({"a": ["a1"], "b": ["b1"]}, now_s=200)
    assert await redis.zscore(A.lease, "a1") == 230  # the other queue's extension stands
