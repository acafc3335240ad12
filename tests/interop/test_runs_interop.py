"""Tasks enqueued by asynq's own Go client (which writes no run index) appear in GET /runs, for
admins only, once the indexer has seen them — pending, scheduled, and after they ran."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from tests.api.conftest import ServiceFactory, make_service
from tests.interop.harness import go
from tests.support import wait_until

__all__ = ["make_service"]  # the fixture, imported so pytest finds it here

pytestmark = pytest.mark.timeout(120)

ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "platform"}
MEMBER = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "ops"}


async def test_go_client_tasks_are_listed_to_admins(
    make_service: ServiceFactory, redis: aioredis.Redis, redis_url: str,
) -> None:
    service = await make_service(admin_groups=("platform",))
    specs = [
        {"type": "echo", "payload": json.dumps({"name": "gopher"}), "retention_s": 3600},
        {"type": "echo", "payload": json.dumps({"name": "later"}), "process_in_s": 3600},
        {"type": "report:build", "payload": "{}", "queue": "reports", "process_in_s": 3600},
    ]
    ran, scheduled, foreign = (r["id"] for r in go("enqueue", redis_url, stdin=specs))

    async def listed() -> dict[str, dict[str, object]] | None:
        status, body, _ = await service.request("GET", "/runs", headers=ADMIN)
        assert status == 200, body
        found = {r["id"]: r for r in body["runs"]}
        return found if {ran, scheduled, foreign} <= found.keys() else None

    found = await wait_until(listed, timeout_s=60, interval_s=0.2, message="Go tasks indexed")
    assert found[foreign]["queue"] == "reports"
    assert found[foreign]["name"] == "report:build"
    assert found[scheduled]["state"] == "scheduled"

    async def ran_to_completion() -> bool:
        status, body, _ = await service.request("GET", "/runs?state=completed", headers=ADMIN)
        return status == 200 and ran in {r["id"] for r in body["runs"]}

    await wait_until(ran_to_completion, timeout_s=60, interval_s=0.2, message="completed")
    # No access record: not for an ordinary member, even of the groups aqsh knows.
    status, body, _ = await service.request("GET", "/runs", headers=MEMBER)
    assert status == 200
    assert {ran, scheduled, foreign}.isdisjoint(r["id"] for r in body["runs"])
