"""Hostile input and hostile clients: every bad request is a 4xx in the JSON envelope, nothing a
client sends produces a 500 or an error in the log, and no 500 body leaks Redis or Lua text."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from aqsh.engine import wire
from aqsh.engine.models import TaskMessage
from tests.api.conftest import Service, ServiceFactory, make_service
from tests.support import wait_until

__all__ = ["make_service"]  # the fixture, imported so pytest finds it here

pytestmark = pytest.mark.timeout(90)


def assert_json_error(status: int, body: Any, expected_status: int, code: str | None = None
                      ) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict), body
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "details"}
    if code is not None:
        assert body["error"]["code"] == code, body


# ---------------------------------------------------------------------------- JSON bodies
@pytest.mark.parametrize("raw", [
    b"[" * 100_000, b"{" * 100_000, b'{"a":' * 50_000, b"[" * 33 + b"]" * 33,
    b'{"name": ' + b"9" * 100_000 + b"}", b'{"name": 1e' + b"9" * 100 + b"}",
    b'{"name": -' + b"1" * 65 + b"}",
])
async def test_hostile_json_is_refused_before_decoding(make_service: ServiceFactory,
                                                       raw: bytes) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("POST", "/tasks/echo", data=raw,
                                            headers={"Content-Type": "application/json"})
    assert_json_error(status, body, 400, "invalid_json")


async def test_bounds_leave_ordinary_json_alone(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False)
    # Brackets and digits inside strings are text, not structure.
    name = "[" * 100 + "{" * 100 + "9" * 100
    status, body, _ = await service.request("POST", "/tasks/secret", json={"name": name},
                                            headers={"X-Forwarded-Groups": "ops"})
    assert status == 202, body
    status, body, _ = await service.request("POST", "/tasks/echo",
                                            json={"name": "a", "times": 3})
    assert status == 202, body


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("query", [
    "process_in=", "process_at=", "process_in=%20", "process_in=99999999999999999999h",
    "process_in=" + "9" * 5000 + "s", "process_in=367d", "process_in=9000h",
    "process_at=2999-01-01T00:00:00Z", "process_at=9999-12-31T23:59:59-14:00",
    "process_at=0001-01-01T00:00:00%2B14:00", "process_at=1970-01-01T00:00:00Z",
    "process_at=2026-01-01T00:00:00", "process_in=1h&process_at=2026-01-01T00:00:00Z",
    "process_in=1h&process_in=", "process_in=-5s",
])
async def test_absurd_schedules_are_400(make_service: ServiceFactory, query: str) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("POST", f"/tasks/echo?{query}", json={"name": "a"})
    assert_json_error(status, body, 400, "invalid_schedule")


@pytest.mark.parametrize("query", ["process_in=90s", "process_in=1h30m", "process_in=8000h"])
async def test_sensible_schedules_are_accepted(make_service: ServiceFactory, query: str) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("POST", f"/tasks/echo?{query}", json={"name": "a"})
    assert (status, body["state"]) == (202, "scheduled"), body


# ---------------------------------------------------------------------------- protocol errors
async def raw_exchange(service: Service, request: bytes, *, timeout_s: float = 30
                       ) -> tuple[int, dict[str, str], bytes]:
    host, port = service.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"GET /tasks/" + b"a" * 16384 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "request_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n",
     "request_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", "request_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n", "bad_request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", "bad_request"),
])
async def test_protocol_errors_use_the_json_envelope(
    make_service: ServiceFactory, request_bytes: bytes, code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import msgspec

    service = await make_service(worker=False)
    with caplog.at_level(logging.ERROR):
        status, headers, body = await raw_exchange(service, request_bytes)
    assert headers["content-type"].startswith("application/json")
    assert_json_error(status, msgspec.json.decode(body), 400, code)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_idle_or_trickling_connection_is_closed(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False, http_idle_timeout_s=1)
    host, port = service.url.removeprefix("http://").split(":")
    for first_bytes in (b"", b"GET /health/live HTTP/1.1\r\nHost: x\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(first_bytes)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
        writer.close()


async def test_a_trickled_body_times_out_with_408(make_service: ServiceFactory) -> None:
    import msgspec

    service = await make_service(worker=False, http_body_timeout_s=1)
    status, _, body = await raw_exchange(
        service, b"POST /tasks/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nConnection: close\r\n\r\n{\"name\":")
    assert_json_error(status, msgspec.json.decode(body), 408, "request_timeout")


async def test_a_client_disconnect_is_not_an_error(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    service = await make_service(worker=False)
    registry = service.state.metrics.registry

    def gone() -> float:
        return registry.get_sample_value("aqsh_http_requests_total", {
            "route": "/tasks/{id}", "method": "POST", "status": "499"}) or 0.0

    host, port = service.url.removeprefix("http://").split(":")
    with capture_logs() as logs, caplog.at_level(logging.ERROR):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /tasks/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"name\":")
        await writer.drain()
        writer.close()
        await wait_until(lambda: gone() >= 1, timeout_s=30, message="the request to end")
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_allow_lists_exactly_the_documented_methods(make_service: ServiceFactory) -> None:
    from aqsh.api.openapi import document

    service = await make_service(worker=False)
    paths = document()["paths"]
    for url, template in (("/tasks/abc", "/tasks/{id}"), ("/tasks/abc/logs", "/tasks/{id}/logs"),
                          ("/tasks", "/tasks")):
        status, body, headers = await service.request("OPTIONS", url)
        assert_json_error(status, body, 405, "method_not_allowed")
        allowed = {m.strip() for m in headers["Allow"].split(",")} - {"HEAD"}
        assert allowed == {m.upper() for m in paths[template]}, url


# ---------------------------------------------------------------------------- 500 bodies
async def test_a_redis_refusal_carries_an_error_id_and_no_redis_text(
    make_service: ServiceFactory, redis: aioredis.Redis, redis_url: str,
) -> None:
    """A real Redis refusal (an ACL without asynq's keys) makes the enqueue fail with NOPERM; the
    client sees an id, the log has Redis's words under that id."""
    await redis.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~aqsh:*", "+@all")
    try:
        url = redis_url.replace("redis://", "redis://limited:pw@")
        service = await make_service(worker=False, url=url)
        with capture_logs() as logs:
            status, body, headers = await service.request("POST", "/tasks/echo",
                                                          json={"name": "a"})
        # NOPERM: the store refuses the operation; a 503 (nothing stored), still without
        # Redis's words.
        assert_json_error(status, body, 503, "redis_error")
        error_id = body["error"]["details"]["error_id"]
        assert headers["X-Error-Id"] == error_id
        assert error_id in body["error"]["message"]
        text = body["error"]["message"].lower()
        for leak in ("noperm", "permission", "lua", "script", "redis", "key"):
            assert leak not in text, leak
        logged = [e for e in logs if e["event"] == "redis.refused"]
        assert [e["error_id"] for e in logged] == [error_id]
        assert "no permissions" in logged[0]["error"].lower()  # Valkey: "No permissions"
    finally:
        await redis.execute_command("ACL", "DELUSER", "limited")


async def test_a_500_carries_an_error_id_and_no_internal_text(
    make_service: ServiceFactory, redis: aioredis.Redis,
) -> None:
    """A task hash in a state no asynq version writes (by hand, or a buggy client): the lookup
    fails inside aqsh; the caller gets an id, never the exception's words."""
    message = TaskMessage(type="echo", id="broken", queue="default", payload=b"{}")
    await redis.hset("asynq:{default}:t:broken", mapping={"msg": wire.encode_task(message),
                                                           "state": "bogus-state"})
    await redis.sadd("asynq:queues", "default")
    service = await make_service(worker=False, admin_groups=("admins",))
    with capture_logs() as logs:  # an admin: a task without an access record is theirs to see
        status, body, headers = await service.request(
            "GET", "/tasks/broken", headers={"X-Forwarded-Groups": "admins"})
    assert_json_error(status, body, 500, "internal")
    error_id = body["error"]["details"]["error_id"]
    assert headers["X-Error-Id"] == error_id
    text = str(body).lower()
    for leak in ("bogus", "valueerror", "traceback", "taskstate"):
        assert leak not in text, leak
    logged = [e for e in logs if e["event"] == "http.internal_error"]
    assert [e["error_id"] for e in logged] == [error_id]


# ---------------------------------------------------------------------------- /metrics
async def test_metrics_scrapes_share_one_computation_per_ttl(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False)
    figures = service.state.metrics.queue_figures
    figures.ttl_s = 3600
    registry = service.state.metrics.registry

    def refreshes() -> float:
        return registry.get_sample_value("aqsh_queue_figures_refreshes_total") or 0.0

    await service.request("POST", "/tasks/echo", json={"name": "a"})
    scrapes = await asyncio.gather(*(service.request("GET", "/metrics") for _ in range(20)))
    for _ in range(10):
        scrapes.append(await service.request("GET", "/metrics"))
    assert {status for status, _, _ in scrapes} == {200}
    assert refreshes() == 1
    assert all('asynq_queue_size{queue="default"} 1.0' in text for _, text, _ in scrapes)
    # Once the figures are stale, the next scrape recomputes them (and sees new tasks).
    await service.request("POST", "/tasks/echo", json={"name": "b"})
    figures.ttl_s = 0
    _, text, _ = await service.request("GET", "/metrics")
    assert refreshes() == 2
    assert 'asynq_queue_size{queue="default"} 2.0' in text
