"""Held runs seen and changed by a real Go asynq v0.26 Inspector (`make interop` builds it):
a waiting run is a scheduled task; Go can delete it or run it, and the limit still holds."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from aqsh.engine import flow, keys
from aqsh.engine.client import Client
from aqsh.engine.rdb import RedisBroker
from tests.interop.harness import go


async def test_go_inspector_lists_deletes_and_runs_held_runs(redis: aioredis.Redis,
                                                            redis_url: str) -> None:
    broker = RedisBroker(redis)
    rule = flow.headers(concurrency=flow.Concurrency("deploy:prod", 1))
    async with Client(redis) as client:
        for n in range(4):
            await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=rule)
    now = int(time.time())
    running = await broker.dequeue_many(["default"], limit=10, now_s=now)
    assert [m.message.id for m in running] == ["d0"]
    held = go("inspect", redis_url, "-queue", "default", "-id", "d2")
    assert (held["state"], held["next_process_at"]) == ("scheduled", flow.HELD_SCORE_S)
    listed = {t["id"] for t in go("list", redis_url, "-queue", "default", "-state",
                                  "scheduled")}
    assert {"d1", "d2", "d3"} <= listed
    # Go deletes one waiter and runs another by hand.
    assert "error" not in (go("mutate", redis_url, "-op", "delete", "-queue", "default",
                              "-id", "d1") or {})
    assert "error" not in (go("mutate", redis_url, "-op", "run", "-queue", "default",
                              "-id", "d3") or {})
    # The run by hand does not get past the limit: it waits again, behind d2.
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=now)] == []
    assert [i.decode() for i in await redis.zrange(
        keys.flow_wait_key("default", "deploy:prod"), 0, -1)] == ["d1", "d2", "d3"]
    # d0 ends: the deleted d1 is skipped, d2 is next.
    await broker.done(running[0].message, now_s=now)
    assert [m.message.id for m in await broker.dequeue_many(["default"], limit=10,
                                                           now_s=now)] == ["d2"]
