"""Every held-run step works under aqsh's documented least-privilege ACL (README, the same
string tests/acl proves for the rest of aqsh): the scripts and the API's reads use only the
commands it grants."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from aqsh.engine import flow
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from aqsh.redis_process import RedisProcess
from tests.acl.test_acl import DEPLOYMENT_ACL

USER = "aqsh-flow-acl"


@pytest.fixture
async def restricted(redis: aioredis.Redis,
                     redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    await redis.execute_command("ACL", "SETUSER", USER, "reset", "on", ">pw",
                                *DEPLOYMENT_ACL.split())
    client = aioredis.Redis.from_url(redis_server.url.replace("redis://", f"redis://{USER}:pw@"))
    try:
        yield client
    finally:
        await client.aclose()
        await redis.execute_command("ACL", "DELUSER", USER)


async def test_held_runs_under_the_documented_acl(restricted: aioredis.Redis,
                                                  redis: aioredis.Redis) -> None:
    broker = RedisBroker(restricted)
    now = int(time.time())
    async with Client(restricted) as client:
        limited = flow.headers(concurrency=flow.Concurrency("deploy:prod", 1),
                               rate=flow.Rate("deploy:prod", 2, 3600))
        for n in range(4):
            await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=limited,
                                 retention=600)
        first = await broker.dequeue_many(["default"], limit=10, now_s=now)
        assert [m.message.id for m in first] == ["d0"]
        waiting = await flow.waiting_many(restricted, [("default", "d1"), ("default", "d3")])
        assert [w.reason if w else None for w in waiting] == ["concurrency", "rate"]
        assert waiting[0] is not None
        assert waiting[0].position == 0
        assert (await broker.finish_successes([first[0].message], now_s=now)) == [None]
        second = await broker.dequeue_many(["default"], limit=10, now_s=now)
        assert [m.message.id for m in second] == ["d1"]
        assert [t for t, _ in await flow.take_waits(restricted, "default")] == ["deploy"]
        assert await broker.repair_flow("default", now_s=now + LEASE_DURATION_S + 1) == 0
        assert await flow.waiting_census(restricted, "default") == {("deploy", "rate"): 2}
        dependent = await client.enqueue(
            "after", b"{}", process_at=datetime.fromtimestamp(flow.AFTER_SCORE_S, UTC),
            headers=flow.after_headers([("default", "d1")]))
        await broker.archive(second[0].message, error_msg="boom", now_s=now)
        assert (await broker.sweep_dependencies("default", now_s=now)).moved == 1
    # Nothing was refused along the way (redis-py's CLIENT SETINFO aside, see tests/acl).
    refusals = [entry for entry in await redis.execute_command("ACL", "LOG")
                if entry[b"username"] == USER.encode()
                and entry[b"object"] not in (b"client|setinfo", b"client")]
    assert refusals == []
    assert dependent.id
