"""Fixtures: one private redis-server per test session, flushed before every test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.redis_process import RedisProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """A bytes client on a freshly flushed database."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=False)
    await client.flushall()
    await client.script_flush()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time (whole seconds) because Redis expires keys by its own clock:
    daily counters get EXPIREAT now + 90 days and must not be born expired."""
    return ManualClock(float(int(time.time())))
