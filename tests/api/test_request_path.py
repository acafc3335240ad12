"""The cheaper request path keeps what it replaced: the access log (now a structlog event),
metrics per route, the Content-Type, and GET's attempt times read over the broker's fast lane
exactly as over redis-py."""

from __future__ import annotations

from typing import Any

import structlog

from aqsh.api.handlers import _attempt_times
from aqsh.engine.fastlane import FastLane
from aqsh.engine.keys import log_meta_key
from tests.api.conftest import ServiceFactory
from tests.api.test_api import finished


async def test_access_log_is_one_event_per_request_with_the_request_facts(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False)
    with structlog.testing.capture_logs() as logs:
        status, _, headers = await service.request(
            "POST", "/tasks/echo?x=1", json={"name": "ada"},
            headers={"User-Agent": "probe/1", "Referer": "http://ref"})
        missing, _, _ = await service.request("GET", "/nowhere")
    assert status == 202
    assert missing == 404
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    served = [e for e in logs if e["event"] == "request.served"]
    assert [(e["method"], e["path"], e["status"]) for e in served] == [
        ("POST", "/tasks/echo?x=1", 202), ("GET", "/nowhere", 404)]
    first = served[0]
    assert first["log_level"] == "info"
    assert first["peer"] == "127.0.0.1"
    assert first["user_agent"] == "probe/1"
    assert first["referer"] == "http://ref"
    assert first["bytes"] > 0
    assert first["duration_ms"] >= 0
    assert "referer" not in served[1]


async def test_request_metrics_still_count_every_route_and_status(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False)
    for _ in range(3):
        assert (await service.request("POST", "/tasks/echo", json={"name": "ada"}))[0] == 202
    assert (await service.request("POST", "/tasks/echo", json={"name": "ADA!"}))[0] == 422
    _, text, _ = await service.request("GET", "/metrics")
    lines = text.splitlines()
    assert ('aqsh_http_requests_total{method="POST",route="/tasks/{id}",status="202"} 3.0'
            in lines)
    assert ('aqsh_http_requests_total{method="POST",route="/tasks/{id}",status="422"} 1.0'
            in lines)
    assert 'aqsh_tasks_submitted_total{task="echo"} 3.0' in lines
    assert any(line.startswith('aqsh_http_request_duration_seconds_count{method="POST",'
                               'route="/tasks/{id}"} 4.0') for line in lines)


async def test_attempt_times_over_the_fast_lane_equal_redis_py(
    make_service: ServiceFactory,
) -> None:
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    task = await finished(service, body["id"], "completed")
    state = service.state
    info = await state.inspector.find_task(body["id"])
    lane = FastLane.from_redis(state.redis)
    assert lane is not None
    assert state.broker.lane is None  # the fixture's broker: redis-py

    async def both() -> tuple[Any, Any]:
        over_redis_py = await _attempt_times(state, info)
        state.broker.lane = lane
        try:
            return over_redis_py, await _attempt_times(state, info)
        finally:
            state.broker.lane = None

    try:
        via_py, via_lane = await both()
        assert via_py == via_lane
        assert via_py[0] is not None
        assert via_py[1] is not None
        assert via_py[0] <= via_py[1]
        assert task["started_at"] is not None
        # Logs written before the meta hash existed: times from the stream's markers.
        await state.redis.delete(log_meta_key(body["id"]))
        old_py, old_lane = await both()
        assert old_py == old_lane
        assert old_py[0] is not None
        assert old_py[1] is not None
    finally:
        await lane.aclose()
