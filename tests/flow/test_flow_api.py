"""Held runs through the HTTP API: a run over its task's concurrency limit waits, and
GET /tasks/{id} and GET /runs say why; it starts when the slot frees."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.api.conftest import TASKS_YAML, ServiceFactory
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "platform"}
HELD_YAML = TASKS_YAML + """\
  hold:
    script: slow.sh
    concurrency: {limit: 1, key: "{lane}"}
    input:
      - {name: lane, env: LANE, required: true}
"""


async def test_a_held_run_says_why_it_waits_and_starts_when_the_slot_frees(
        make_service: ServiceFactory, redis: aioredis.Redis) -> None:
    service = await make_service(tasks_yaml=HELD_YAML, admin_groups=("platform",))

    async def submit(lane: str) -> str:
        status, reply, _ = await service.request("POST", "/tasks/hold", json={"lane": lane},
                                                 headers=ADMIN)
        assert status == 202, reply
        return str(reply["id"])

    async def doc(task_id: str) -> dict[str, Any]:
        status, body, _ = await service.request("GET", f"/tasks/{task_id}", headers=ADMIN)
        assert status == 200, body
        return dict(body)

    first = await submit("a")
    await wait_until(lambda: _state_is(doc, first, "active"), timeout_s=30,
                     message="the first run active")
    second, third = await submit("a"), await submit("a")
    other = await submit("b")  # another key: not held
    await wait_until(lambda: _state_is(doc, third, "scheduled"), timeout_s=30,
                     message="the third run held")
    held = await doc(second)
    assert held["state"] == "scheduled"
    assert held["waiting"]["reason"] == "concurrency"
    assert held["waiting"]["key"] == "hold:a"
    assert held["waiting"]["position"] == 0
    assert held["waiting"]["since"] is not None
    assert (await doc(third))["waiting"]["position"] == 1
    await wait_until(lambda: _state_is(doc, other, "active"), timeout_s=30,
                     message="the other key's run active")
    assert "waiting" not in await doc(first)
    status, body, _ = await service.request("GET", "/runs?task=hold", headers=ADMIN)
    assert status == 200, body
    by_id = {r["id"]: r for r in body["runs"]}
    assert by_id[second]["waiting"] == held["waiting"]
    assert "waiting" not in by_id[other]
    status, text, _ = await service.request("GET", "/metrics")
    assert status == 200
    assert 'aqsh_runs_waiting{reason="concurrency",task="hold"} 2.0' in text
    # Cancelling the holder frees its slot: the next in line runs, the third moves up.
    status, _, _ = await service.request("DELETE", f"/tasks/{first}", headers=ADMIN)
    assert status in (200, 202)
    await wait_until(lambda: _state_is(doc, second, "active"), timeout_s=30,
                     message="the second run started")
    assert "waiting" not in await doc(second)

    async def wait_observed() -> bool:
        _, text, _ = await service.request("GET", "/metrics")
        return 'aqsh_run_wait_seconds_count{task="hold"} 1.0' in text

    await wait_until(wait_observed, timeout_s=30, interval_s=0.5,
                     message="the second run's wait in the histogram")
    assert (await doc(third))["waiting"]["position"] == 0


async def _state_is(doc: Any, task_id: str, state: str) -> bool:
    return bool((await doc(task_id))["state"] == state)


async def test_get_tasks_lists_each_task_types_limits_as_configured(
        make_service: ServiceFactory) -> None:
    yaml = HELD_YAML + """\
  paced:
    script: echo.sh
    rate_limit: {limit: 10, per: 1m, key: "{name}"}
    concurrency: {limit: 3}
    input:
      - {name: name, env: NAME, required: true}
      - {name: times, env: TIMES, type: int, default: 1}
"""
    service = await make_service(tasks_yaml=yaml, admin_groups=("platform",))
    status, body, _ = await service.request("GET", "/tasks", headers=ADMIN)
    assert status == 200, body
    by_name = {t["name"]: t for t in body["tasks"]}
    assert by_name["hold"]["concurrency"] == {"limit": 1, "key": "{lane}"}
    assert by_name["hold"]["rate_limit"] is None
    assert by_name["paced"]["concurrency"] == {"limit": 3, "key": None}
    assert by_name["paced"]["rate_limit"] == {"limit": 10, "per_s": 60, "key": "{name}"}
    assert by_name["echo"]["concurrency"] is None
    assert by_name["echo"]["rate_limit"] is None
