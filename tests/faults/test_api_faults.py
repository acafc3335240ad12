"""The HTTP side of Redis faults: a submission during an error reply is answered 503 and stores
nothing (so a retry cannot run it twice), the probes say which loop fails and why, and once the
fault clears the same request is accepted and runs."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from aqsh.engine import keys
from tests.api.conftest import ServiceFactory, make_service  # noqa: F401 — the fixture
from tests.support import wait_until

Q = keys.queue_keys("default")


@pytest.mark.parametrize("fast_lane", [False, True], ids=["redis-py", "fast-lane"])
async def test_submit_and_probes_during_oom(
    make_service: ServiceFactory, redis: aioredis.Redis, fast_lane: bool  # noqa: F811
) -> None:
    service = await make_service(fast_lane=fast_lane, submit_retry_s=0.3)
    assert service.server is not None
    await wait_until(lambda: service.state.loops.report()[0], message="ready at start")
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        status, body, headers = await service.request("POST", "/tasks/echo",
                                                      json={"name": "ada"})
        assert (status, body["error"]["code"]) == (503, "redis_unavailable")
        assert headers.get("Retry-After")
        monitors = service.state.loops.monitors

        async def reported() -> bool:
            code, ready, _ = await service.request("GET", "/health/ready")
            return code == 503 and ready["loops"]["fetcher"].get("not_ready", "").startswith(
                "failing: oom")

        await wait_until(reported, message="ready names the failing fetcher")
        assert monitors["fetcher"].last_kind == "oom"
        live = await service.request("GET", "/health/live")
        assert live[0] == 200  # failing, not wedged: a restart would not cure it
        metrics = (await service.request("GET", "/metrics"))[1]
        assert 'aqsh_loop_errors_total{kind="oom",loop="fetcher"}' in metrics
    finally:
        await redis.config_set("maxmemory", 0)
    assert await redis.llen(Q.pending) == 0  # the 503 stored nothing
    status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    assert status == 202

    async def completed() -> bool:
        code, task, _ = await service.request("GET", f"/tasks/{body['id']}")
        return code == 200 and task["state"] == "completed"

    await wait_until(completed, timeout_s=10, message="task ran after the fault")
    await wait_until(lambda: service.state.loops.report()[0], timeout_s=10,
                     message="ready again")
    assert (await service.request("GET", "/health/ready"))[0] == 200


async def test_task_is_found_after_redis_lost_its_queue_list(
    make_service: ServiceFactory, redis: aioredis.Redis  # noqa: F811
) -> None:
    """A Redis that restarted empty (or was flushed) lost ``asynq:queues``; the API process
    still caches that it registered the queue. New tasks must still be found by id."""
    service = await make_service()
    first = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    assert first[0] == 202
    await redis.flushall()
    status, body, _ = await service.request("POST", "/tasks/slow")
    assert status == 202
    found = await service.request("GET", f"/tasks/{body['id']}")
    assert found[0] == 200, found
    assert (await service.request("GET", f"/tasks/{body['id']}/logs?follow=false"))[0] == 200
    assert (await service.request("DELETE", f"/tasks/{body['id']}"))[0] in (200, 202)
