"""API submit under each fault from Redis itself (the worker side is test_worker_faults.py): a
submission during OOM, MISCONF, READONLY, BUSY, NOPERM or LOADING is answered 503 and stores
nothing; the probe reports the fault; once it clears the same request is accepted and runs, and
the store holds exactly the one task that was accepted."""

from __future__ import annotations

import pytest

from tests.api.conftest import ServiceFactory, make_service  # noqa: F401 — the fixture
from tests.faults.test_worker_faults import FAULTS, Rig, rig  # noqa: F401 — the fixture
from tests.support import wait_until


@pytest.mark.parametrize("fast_lane", [False, True], ids=["redis-py", "fast-lane"])
@pytest.mark.parametrize("rig", FAULTS, indirect=True)
async def test_submit_during_a_redis_fault_is_503_and_loses_nothing(
    rig: Rig, make_service: ServiceFactory, fast_lane: bool  # noqa: F811
) -> None:
    service = await make_service(url=rig.url, fast_lane=fast_lane, submit_retry_s=0.3)
    await wait_until(lambda: service.state.loops.report()[0], timeout_s=20,
                     message="ready at start")
    await rig.inject()
    status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    assert status == 503, body
    assert body["error"]["code"] in ("redis_unavailable", "redis_error")
    if rig.kind != "busy":  # BUSY ends by itself within seconds; the others last until cleared
        async def not_ready() -> bool:
            return (await service.request("GET", "/health/ready"))[0] == 503

        await wait_until(not_ready, message="ready reports the fault")
    await rig.clear()

    async def accepted() -> dict[str, str] | None:
        code, made, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
        return made if code == 202 else None

    made = await wait_until(accepted, timeout_s=10, message="submissions accepted again")

    async def completed() -> bool:
        code, task, _ = await service.request("GET", f"/tasks/{made['id']}")
        return code == 200 and task["state"] == "completed"

    await wait_until(completed, timeout_s=15, message="the accepted task ran")
    stored = [key async for key in rig.admin.scan_iter(match="asynq:{default}:t:*")]
    assert stored == [f"asynq:{{default}}:t:{made['id']}".encode()]  # the 503s stored nothing
