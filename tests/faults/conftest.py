"""Fixtures for the fault suite: a private ``redis-server`` per test (faults change its
configuration, role or life) and the TCP fault proxy in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from aqsh.redis_process import RedisProcess
from tests.api.conftest import make_service  # noqa: F401  (the real service, for SSE)
from tests.fault_proxy import FaultProxy


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """Append-only, so a stop and start keeps the data (an outage, not a flush)."""
    with RedisProcess(persistent=True) as server:
        yield server


@pytest.fixture
async def admin(private_redis: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """A connection for injecting and clearing faults, and for reading what was written."""
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=10)
    yield client
    await client.aclose()


@pytest.fixture
async def proxy(private_redis: RedisProcess) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(private_redis.port) as made:
        yield made
