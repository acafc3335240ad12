"""``POST /tasks/{name}?after=id[,id]``: a run that waits until other tasks completed, and is
cancelled when one of them failed or was cancelled. A real app, worker and Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.engine import keys
from tests.api.conftest import TASKS_YAML, Service, ServiceFactory
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "platform"}
DEV = {"X-Forwarded-User": "dan", "X-Forwarded-Groups": "dev"}
AFTER_YAML = TASKS_YAML + """\
  boom:
    script: boom.sh
"""


@pytest.fixture(autouse=True)
def boom_script(tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "boom.sh").write_text("#!/bin/sh\necho failing\nexit 3\n")
    (scripts / "boom.sh").chmod(0o755)


async def submit(service: Service, task: str, body: dict[str, Any], query: str = "",
                 headers: dict[str, str] = ADMIN) -> tuple[int, Any]:
    status, reply, _ = await service.request("POST", f"/tasks/{task}{query}", json=body,
                                             headers=headers)
    return status, reply


async def accepted(service: Service, task: str, body: dict[str, Any], query: str = "") -> str:
    status, reply = await submit(service, task, body, query)
    assert status == 202, reply
    return str(reply["id"])


async def doc(service: Service, task_id: str) -> dict[str, Any]:
    status, body, _ = await service.request("GET", f"/tasks/{task_id}", headers=ADMIN)
    assert status == 200, body
    return dict(body)


async def ended(service: Service, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await doc(service, task_id)
        return body if body["state"] in ("completed", "archived", "canceled") else None

    return await wait_until(check, timeout_s=60, interval_s=0.05, message=f"{task_id} ended")


async def test_a_chain_runs_in_order(make_service: ServiceFactory) -> None:
    service = await make_service(tasks_yaml=AFTER_YAML, admin_groups=("platform",))
    first = await accepted(service, "slow", {})
    second = await accepted(service, "echo", {"name": "second"}, f"?after={first}")
    third = await accepted(service, "echo", {"name": "third"}, f"?after={first},{second}")
    held = await doc(service, second)
    assert held["state"] == "scheduled"
    assert held["waiting"]["reason"] == "after"
    assert held["waiting"]["key"] == first
    await wait_until(lambda: _active(service, first), timeout_s=30, message="first running")
    assert (await doc(service, third))["waiting"]["key"] == f"{first},{second}"
    # The dependency is still running: nothing moved.
    assert (await doc(service, second))["state"] == "scheduled"


async def test_a_dependency_that_completes_starts_the_next(
        make_service: ServiceFactory) -> None:
    service = await make_service(tasks_yaml=AFTER_YAML, admin_groups=("platform",))
    first = await accepted(service, "echo", {"name": "first"})
    second = await accepted(service, "echo", {"name": "second"}, f"?after={first}")
    third = await accepted(service, "echo", {"name": "third"}, f"?after={second}")
    docs = [await ended(service, i) for i in (first, second, third)]
    assert [d["state"] for d in docs] == ["completed"] * 3
    assert docs[0]["finished_at"] <= docs[1]["started_at"]
    assert docs[1]["finished_at"] <= docs[2]["started_at"]
    assert all("waiting" not in d for d in docs)

    # The two dependency waits are in the wait histogram (the first run never waited).
    async def waits_observed() -> bool:
        _, text, _ = await service.request("GET", "/metrics")
        return 'aqsh_run_wait_seconds_count{task="echo"} 2.0' in text

    await wait_until(waits_observed, timeout_s=30, interval_s=0.5,
                     message="the dependency waits in the histogram")


async def test_a_failed_dependency_cancels_the_chain_naming_it(
        make_service: ServiceFactory) -> None:
    service = await make_service(tasks_yaml=AFTER_YAML, admin_groups=("platform",))
    first = await accepted(service, "boom", {})
    second = await accepted(service, "echo", {"name": "second"}, f"?after={first}")
    third = await accepted(service, "echo", {"name": "third"}, f"?after={second}")
    assert (await ended(service, first))["state"] == "archived"
    second_doc = await ended(service, second)
    assert second_doc["state"] == "archived"
    assert first in second_doc["last_error"]
    assert second_doc["started_at"] is None  # it never ran
    third_doc = await ended(service, third)
    assert third_doc["state"] == "archived"
    assert second in third_doc["last_error"]


async def test_a_cancelled_dependency_cancels_the_dependent(
        make_service: ServiceFactory, redis: aioredis.Redis) -> None:
    service = await make_service(tasks_yaml=AFTER_YAML, admin_groups=("platform",))
    first = await accepted(service, "slow", {})
    second = await accepted(service, "echo", {"name": "second"}, f"?after={first}")
    await wait_until(lambda: _active(service, first), timeout_s=30, message="first running")
    status, _, _ = await service.request("DELETE", f"/tasks/{first}", headers=ADMIN)
    assert status in (200, 202)
    second_doc = await ended(service, second)
    assert second_doc["state"] == "archived"
    assert first in second_doc["last_error"]
    assert await redis.zscore(keys.queue_keys("default").scheduled, second) is None


async def test_unknown_or_invisible_dependencies_are_404(
        make_service: ServiceFactory) -> None:
    service = await make_service(tasks_yaml=AFTER_YAML, admin_groups=("platform",))
    status, reply = await submit(service, "echo", {"name": "x"}, "?after=nope")
    assert status == 404
    assert reply["error"]["code"] == "dependency_not_found"
    hidden = await accepted(service, "secret", {"name": "s"})  # for ops and admins only
    status, reply = await submit(service, "echo", {"name": "x"}, f"?after={hidden}",
                                 headers=DEV)
    assert status == 404
    assert reply["error"]["code"] == "dependency_not_found"
    status, reply = await submit(service, "echo", {"name": "x"}, f"?after={hidden}",
                                 headers=ADMIN)
    assert status == 202


async def _active(service: Service, task_id: str) -> bool:
    return (await doc(service, task_id))["state"] == "active"
