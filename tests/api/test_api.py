"""The HTTP API against a real app on a real port, a real Redis and a real worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.api.openapi import document
from aqsh.engine import keys
from tests.api.conftest import Service, ServiceFactory, sse_events
from tests.support import wait_until

pytestmark = pytest.mark.timeout(90)


async def finished(service: Service, task_id: str, *states: str) -> dict[str, Any]:
    wanted = states or ("completed", "archived", "canceled")

    async def check() -> dict[str, Any] | None:
        status, body, _ = await service.request("GET", f"/tasks/{task_id}")
        return body if status == 200 and body["state"] in wanted else None

    return await wait_until(check, timeout_s=30, interval_s=0.05, message=f"task in {wanted}")


async def test_submit_follow_logs_and_read_result(make_service: ServiceFactory) -> None:
    service = await make_service()
    status, body, _ = await service.request(
        "POST", "/tasks/echo", json={"name": "ada", "times": 3},
        headers={"X-Forwarded-User": "alice"})
    assert status == 202, body
    assert body["name"] == "echo"
    assert body["queue"] == "default"
    assert body["state"] == "pending"
    assert body["submitted_by"] == "alice"
    assert body["links"] == {"self": f"/tasks/{body['id']}", "logs": f"/tasks/{body['id']}/logs"}
    events = await sse_events(service, body["id"])
    assert [e["data"] for e in events if "event" not in e] == ["hello ada"] * 3
    assert events[-1]["event"] == "eof"
    assert events[-1]["data"] == "0"
    task = await finished(service, body["id"], "completed")
    assert task["input"] == {"name": "ada", "times": 3}
    assert task["submitted_by"] == "alice"
    assert task["result"] == {"exit_code": 0}
    assert task["retries"] == 0
    assert task["enqueued_at"] <= task["started_at"] <= task["finished_at"]
    status, text, headers = await service.request("GET", f"/tasks/{body['id']}/logs?follow=false")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert text == "hello ada\nhello ada\nhello ada\n"


async def test_result_file_comes_back(make_service: ServiceFactory) -> None:
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/result", json={})
    task = await finished(service, body["id"], "completed")
    assert task["result"] == {"exit_code": 0, "data": '{"ok":true}'}


async def test_validation_and_routing_errors_are_json(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False, max_body_bytes=2048)
    status, body, _ = await service.request("POST", "/tasks/echo",
                                            json={"name": "A1", "times": 9, "extra": 1})
    assert status == 422
    assert body["error"]["code"] == "invalid_input"
    fields = {d["field"]: d["code"] for d in body["error"]["details"]}
    assert fields == {"name": "pattern", "times": "max", "extra": "unknown_field"}
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/tasks/nope", {"json": {}}, 404, "task_type_not_found"),
        ("GET", "/tasks/no-such-id", {}, 404, "task_not_found"),
        ("GET", "/no/route", {}, 404, "not_found"),
        ("PUT", "/tasks/echo", {}, 405, "method_not_allowed"),
        ("POST", "/tasks/echo", {"data": b"{not json", "headers": {
            "Content-Type": "application/json"}}, 400, "invalid_json"),
        ("POST", "/tasks/echo", {"data": b"x" * 5000, "headers": {
            "Content-Type": "application/json"}}, 413, "payload_too_large"),
        ("POST", "/tasks/echo", {"data": b"name=a", "headers": {
            "Content-Type": "application/x-www-form-urlencoded"}}, 415,
         "unsupported_media_type"),
        ("POST", "/tasks/echo?process_in=soon", {"json": {"name": "a"}}, 400,
         "invalid_schedule"),
        ("GET", "/tasks/x/logs", {"headers": {"Last-Event-ID": "abc"}}, 404, "task_not_found"),
    ]
    for method, path, kwargs, expected_status, code in cases:
        status, body, _ = await service.request(method, path, **kwargs)
        assert status == expected_status, (path, body)
        assert body["error"]["code"] == code, (path, body)
        assert set(body["error"]) <= {"code", "message", "details"}


async def test_identity_and_groups_matrix(make_service: ServiceFactory) -> None:
    service = await make_service(require_identity=True)
    anon = await service.request("POST", "/tasks/echo", json={"name": "a"})
    assert anon[0] == 401
    assert anon[1]["error"]["code"] == "unauthenticated"
    assert (await service.request("GET", "/tasks"))[0] == 401
    user = {"X-Forwarded-User": "bob"}
    outsider = {**user, "X-Forwarded-Groups": "dev, qa"}
    member = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "qa,ops"}
    denied = await service.request("POST", "/tasks/secret", json={"name": "x"}, headers=outsider)
    assert denied[0] == 403
    assert denied[1]["error"]["code"] == "forbidden"
    status, body, _ = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                            headers=member)
    assert status == 202
    task_id = body["id"]
    for method, path in (("GET", f"/tasks/{task_id}"), ("DELETE", f"/tasks/{task_id}"),
                         ("GET", f"/tasks/{task_id}/logs")):
        # Not 403: a caller who may not see a task cannot tell it from a missing one.
        assert (await service.request(method, path, headers=outsider))[0] == 404, path
        assert (await service.request(method, path))[0] == 401, path
    assert (await service.request("GET", f"/tasks/{task_id}", headers=member))[0] == 200
    # Unrestricted tasks: any identified caller.
    assert (await service.request("POST", "/tasks/echo", json={"name": "a"}, headers=user))[
        0] == 202
    # Health and metrics stay open for probes and scrapers.
    assert (await service.request("GET", "/health/live"))[0] == 200


async def test_sse_resume_with_last_event_id(make_service: ServiceFactory) -> None:
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/lines", json={"count": 50})
    await finished(service, body["id"], "completed")
    first = await sse_events(service, body["id"], limit=20)
    assert [e["data"] for e in first] == [f"line {i}" for i in range(20)]
    rest = await sse_events(service, body["id"], last_event_id=first[-1]["id"])
    assert [e["data"] for e in rest if "event" not in e] == [f"line {i}" for i in range(20, 50)]
    assert rest[-1]["event"] == "eof"
    ids = [e["id"] for e in first + rest[:-1]]
    assert len(set(ids)) == 50
    bad = await service.request("GET", f"/tasks/{body['id']}/logs",
                                headers={"Last-Event-ID": "not-an-id"})
    assert bad[0] == 400


async def test_live_follow_and_many_followers(make_service: ServiceFactory) -> None:
    import asyncio

    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/echo?process_in=1s",
                                       json={"name": "live", "times": 2})
    assert body["state"] == "scheduled"
    # Followers attach before the task runs and see it live (forwarder runs every 5 s).
    followers = [asyncio.create_task(sse_events(service, body["id"])) for _ in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*followers), 30)
    for events in results:
        assert [e["data"] for e in events] == ["hello live", "hello live", "0"]


async def test_cancel_running_pending_and_finished(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service()
    _, running, _ = await service.request("POST", "/tasks/slow", json={})
    await sse_events(service, running["id"], limit=1)  # "started" printed
    status, body, _ = await service.request("DELETE", f"/tasks/{running['id']}")
    # The script stops on SIGTERM at once: the answer waits for that and says it happened.
    assert (status, body["state"]) == (200, "canceled")
    task = await finished(service, running["id"], "canceled")
    assert task["result"] == {"exit_code": -15, "error": "canceled"}

    _, later, _ = await service.request("POST", "/tasks/echo?process_in=1h", json={"name": "x"})
    status, body, _ = await service.request("DELETE", f"/tasks/{later['id']}")
    assert (status, body["state"]) == (200, "canceled")
    assert (await service.request("GET", f"/tasks/{later['id']}"))[1]["state"] == "canceled"
    assert await redis.zcard(keys.queue_keys("default").scheduled) == 0

    status, body, _ = await service.request("DELETE", f"/tasks/{later['id']}")
    assert status == 409
    assert body["error"]["code"] == "task_finished"


async def test_idempotency_key(make_service: ServiceFactory, redis: aioredis.Redis) -> None:
    service = await make_service(worker=False)
    headers = {"Idempotency-Key": "deploy-42"}
    first = await service.request("POST", "/tasks/echo", json={"name": "a"}, headers=headers)
    again = await service.request("POST", "/tasks/echo", json={"name": "a"}, headers=headers)
    assert first[0] == again[0] == 202
    assert first[1]["id"] == again[1]["id"]
    assert await redis.llen(keys.queue_keys("default").pending) == 1
    other = await service.request("POST", "/tasks/echo", json={"name": "b"}, headers=headers)
    assert other[0] == 409
    assert other[1]["error"]["code"] == "idempotency_conflict"
    fresh = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                  headers={"Idempotency-Key": "deploy-43"})
    assert fresh[1]["id"] != first[1]["id"]


async def test_idempotency_key_never_runs_a_task_twice_after_its_retention_ends(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service(worker=False)
    headers = {"Idempotency-Key": "nightly-7"}
    status, first, _ = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                             headers=headers)
    assert status == 202
    # The task ran and its retention ended before the key's window did: it is gone.
    await service.state.inspector.delete_task("default", first["id"])
    status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                            headers=headers)
    assert status == 410
    assert body["error"]["code"] == "idempotent_task_expired"
    assert body["error"]["details"] == {"id": first["id"]}
    assert await redis.llen(keys.queue_keys("default").pending) == 0


@pytest.mark.parametrize("fast_lane", [False, True])
async def test_idempotent_retry_after_a_failed_enqueue_creates_the_task(
    make_service: ServiceFactory, redis: aioredis.Redis, redis_url: str, fast_lane: bool
) -> None:
    """The key is recorded before the enqueue; when the enqueue then fails, the client's retry
    with the same key must create the task, not report it missing. The failure is real: an ACL
    that lets the API write its idempotency records but not yet asynq's keys."""
    await redis.execute_command("ACL", "SETUSER", "api", "on", ">pw", "~aqsh:*", "+@all")
    try:
        url = redis_url.replace("redis://", "redis://api:pw@")
        service = await make_service(worker=False, url=url, fast_lane=fast_lane)
        headers = {"Idempotency-Key": "deploy-44"}
        failed = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                       headers=headers)
        # NOPERM needs an operator: the service cannot store tasks, and says so (503).
        assert (failed[0], failed[1]["error"]["code"]) == (503, "redis_error")
        assert await redis.keys("aqsh:idem:*") != []
        assert await redis.keys("asynq:*") == []
        await redis.execute_command("ACL", "SETUSER", "api", "allkeys")
        status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                                headers=headers)
        assert status == 202
        pending = keys.queue_keys("default").pending
        assert await redis.lrange(pending, 0, -1) == [body["id"].encode()]
        again = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                      headers=headers)
        assert (again[0], again[1]["id"]) == (202, body["id"])
        assert await redis.llen(pending) == 1
    finally:
        await redis.execute_command("ACL", "DELUSER", "api")


async def test_catalogue_health_metrics_and_openapi(make_service: ServiceFactory) -> None:
    service = await make_service()
    status, body, _ = await service.request("GET", "/tasks")
    assert status == 200
    echo = next(t for t in body["tasks"] if t["name"] == "echo")
    assert echo["description"] == "Echo a name"
    assert echo["input_schema"]["required"] == ["name"]
    assert echo["input_schema"]["properties"]["name"]["pattern"] == "^(?:[a-z]+)$"
    status, body, _ = await service.request("GET", "/health")
    assert status == 200
    assert body["redis"]["reachable"] is True
    assert body["mode"] == "both"
    assert (await service.request("GET", "/health/ready"))[0] == 200
    _, submitted, _ = await service.request("POST", "/tasks/echo", json={"name": "m"})
    await finished(service, submitted["id"], "completed")
    status, text, _ = await service.request("GET", "/metrics")
    assert status == 200
    assert 'asynq_queue_size{queue="default"}' in text
    assert 'asynq_tasks_processed_total{queue="default"} 1.0' in text
    assert 'asynq_tasks_enqueued_total{queue="default",state="completed"} 1.0' in text
    assert 'aqsh_tasks_submitted_total{task="echo"} 1.0' in text
    assert 'aqsh_tasks_finished_total{outcome="succeeded",task="echo"} 1.0' in text
    assert 'aqsh_http_requests_total{method="POST",route="/tasks/{id}",status="202"}' in text
    assert "aqsh_script_duration_seconds_bucket" in text
    assert "aqsh_sse_clients 0.0" in text


async def test_openapi_matches_the_router(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False)
    status, doc, _ = await service.request("GET", "/openapi.json")
    assert status == 200
    config = service.state.config()
    visible = [config.tasks[n] for n in sorted(config.tasks) if not config.tasks[n].allowed_groups]
    assert doc == document(visible)
    assert doc["openapi"] == "3.1.0"
    from aqsh.api.app import create_app

    router = create_app(service.state).router
    # The console's HTML pages (/ui) are no API operations: the document leaves them out.
    routes = {(r.method.lower(), r.resource.canonical) for r in router.routes()
              if r.method != "HEAD" and r.resource is not None
              and not r.resource.canonical.startswith("/ui")}
    assert ("get", "/ui/runs/{id}") in {(r.method.lower(), r.resource.canonical)
                                        for r in router.routes() if r.resource is not None}
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert routes == documented
    for path, item in doc["paths"].items():
        if path.startswith("/health"):
            continue  # probes answer 503 with their status body, not an error object
        for operation in item.values():
            for code, response in operation["responses"].items():
                if int(code) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}


@pytest.mark.parametrize("fast_lane", [False, True])
async def test_redis_outage_gives_503_then_recovers(make_service: ServiceFactory,
                                                    fast_lane: bool) -> None:
    from aqsh.redis_process import RedisProcess

    with RedisProcess(persistent=True) as outage_redis:
        service = await make_service(worker=False, url=outage_redis.url, fast_lane=fast_lane,
                                     submit_retry_s=0.3)
        assert (await service.request("POST", "/tasks/echo", json={"name": "a"}))[0] == 202
        outage_redis.stop_keep_data()
        status, body, headers = await service.request("POST", "/tasks/echo", json={"name": "b"})
        assert status == 503
        assert body["error"]["code"] == "redis_unavailable"
        assert headers["Retry-After"] == "5"
        assert (await service.request("GET", "/health"))[0] == 503
        assert (await service.request("GET", "/health/ready"))[0] == 503
        assert (await service.request("GET", "/health/live"))[0] == 200
        outage_redis.start()

        async def accepted() -> bool:
            status, _, _ = await service.request("POST", "/tasks/echo", json={"name": "c"})
            return status == 202

        await wait_until(accepted, timeout_s=15, interval_s=0.2, message="recovered")
        pending = await service.state.redis.llen(keys.queue_keys("default").pending)
        assert pending == 2  # the accepted ones, none lost, the refused one never enqueued


@pytest.mark.parametrize("fast_lane", [False, True])
async def test_a_submission_rides_out_a_short_redis_outage(make_service: ServiceFactory,
                                                           fast_lane: bool) -> None:
    from aqsh.redis_process import RedisProcess

    with RedisProcess(persistent=True) as outage_redis:
        service = await make_service(worker=False, url=outage_redis.url, fast_lane=fast_lane,
                                     submit_retry_s=20)
        registry = service.state.metrics.registry

        def retries() -> float:
            return registry.get_sample_value("aqsh_submit_retries_total") or 0.0

        outage_redis.stop_keep_data()
        submit = asyncio.create_task(service.request(
            "POST", "/tasks/echo", json={"name": "patient"}, headers={"Idempotency-Key": "k1"}))
        await wait_until(lambda: retries() >= 2, timeout_s=10, message="retrying")
        assert not submit.done()
        outage_redis.start()
        status, body, _ = await submit
        assert status == 202
        redis = service.state.redis
        assert await redis.lrange(keys.queue_keys("default").pending, 0, -1) == [
            body["id"].encode()]
