"""The cheaper request path keeps what it replaced: the access log (now a structlog event),
metrics per route, the Content-Type, and GET's attempt times read over the broker's fast lane
exactly as over redis-py."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from aqsh import errors
from aqsh.api.app import YOUNG_GC_THRESHOLD
from aqsh.api.errors import ApiError
from aqsh.api.handlers import check_json_shape
from aqsh.api.view import attempt_times
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.fastlane import FastLane
from aqsh.engine.inspect import Inspector
from aqsh.engine.keys import log_key, log_meta_key
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scripts import Batch, Scripts
from aqsh.redis_process import free_port
from aqsh.runner.spec import access_headers
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


async def test_a_submission_is_logged_on_its_access_log_line(
    make_service: ServiceFactory,
) -> None:
    """task.submitted's facts (task_id, name, queue, user) ride on the POST's one line."""
    service = await make_service(worker=False)
    with structlog.testing.capture_logs() as logs:
        status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
        refused, _, _ = await service.request("POST", "/tasks/echo", json={"name": "ADA!"})
    assert (status, refused) == (202, 422)
    assert [e["event"] for e in logs] == ["request.served", "request.served"]
    accepted, invalid = logs
    assert (accepted["task_id"], accepted["name"], accepted["queue"], accepted["user"]) == (
        body["id"], "echo", "default", None)
    assert "task_id" not in invalid


async def test_attempt_times_script_equals_the_pipeline(
    make_service: ServiceFactory,
) -> None:
    """lua/log_attempt_times.lua reads what view.attempt_times reads, from the meta hash and,
    for logs older than it, from the stream's markers."""
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    task = await finished(service, body["id"], "completed")
    state = service.state
    scripts = Scripts(state.redis)

    async def both() -> tuple[Any, Any]:
        reply = await scripts.run("log_attempt_times",
                                  [log_meta_key(body["id"]), log_key(body["id"])], [])
        return (await attempt_times(state.redis, body["id"]),
                tuple(None if ms is None else int(ms) for ms in reply))

    via_py, via_script = await both()
    assert via_py == via_script
    assert via_py[0] is not None
    assert via_py[1] is not None
    assert via_py[0] <= via_py[1]
    assert task["started_at"] is not None
    await state.redis.delete(log_meta_key(body["id"]))
    old_py, old_script = await both()
    assert old_py == old_script
    assert old_py[0] is not None
    assert old_py[1] is not None
    await state.redis.delete(log_key(body["id"]))
    assert await both() == ((None, None), (None, None))


@pytest.fixture
async def lane(redis: aioredis.Redis) -> AsyncIterator[FastLane]:
    made = FastLane.from_redis(redis)
    assert made is not None
    yield made
    await made.aclose()


async def test_find_task_over_the_lane_in_every_state(
    redis: aioredis.Redis, clock: ManualClock, lane: FastLane,
) -> None:
    """One lookup script per queue over the fast lane answers what the redis-py path answers,
    in every state, for an unknown id too."""
    client, broker = Client(redis, clock=clock), RedisBroker(redis)
    over_lane = Inspector(redis, clock=clock, lane=lane)
    over_py = Inspector(redis, clock=clock)
    now = unix_s(clock)
    pending = await client.enqueue("a", b"p", queue="q1")
    scheduled = await client.enqueue("a", b"s", queue="q2", process_in=60)
    await client.enqueue("a", b"x", queue="q3", retention=60)
    leased = await broker.dequeue(["q3"], now_s=now)
    assert leased is not None
    await broker.mark_as_complete(leased.message, now_s=now)
    await client.enqueue("a", b"r", queue="q3")
    retried = await broker.dequeue(["q3"], now_s=now)
    assert retried is not None
    await broker.retry(retried.message, retry_at_s=now + 30, error_msg="boom",
                       is_failure=True, now_s=now)
    await client.enqueue("a", b"z", queue="q4")
    dead = await broker.dequeue(["q4"], now_s=now)
    assert dead is not None
    await broker.archive(dead.message, error_msg="gone", now_s=now)
    await client.enqueue("a", b"a", queue="q4")
    active = await broker.dequeue(["q4"], now_s=now)
    assert active is not None
    await redis.hset(keys.queue_keys("q3").task(leased.message.id), "result", b"done!")

    expected = {
        pending.id: (TaskState.PENDING, "q1", now, False),
        scheduled.id: (TaskState.SCHEDULED, "q2", now + 60, False),
        leased.message.id: (TaskState.COMPLETED, "q3", 0, False),
        retried.message.id: (TaskState.RETRY, "q3", now + 30, False),
        dead.message.id: (TaskState.ARCHIVED, "q4", 0, False),
        active.message.id: (TaskState.ACTIVE, "q4", 0, False),
    }
    for task_id, (state, queue, next_at, orphaned) in expected.items():
        for inspector in (over_lane, over_py):
            found = await inspector.find_task(task_id)
            assert (found.id, found.state, found.queue, found.next_process_at_s,
                    found.is_orphaned) == (task_id, state, queue, next_at, orphaned)
        assert await over_lane.find_task(task_id) == await over_py.find_task(task_id)
    assert (await over_lane.find_task(leased.message.id)).result == b"done!"
    assert (await over_lane.find_many([("q4", active.message.id), ("q1", "nope")]))[1] is None
    clock.advance(LEASE_DURATION_S + 1)  # the lease lapses: orphaned, on both paths
    assert (await over_lane.find_task(active.message.id)).is_orphaned
    assert (await over_py.find_task(active.message.id)).is_orphaned
    for inspector in (over_lane, over_py):
        with pytest.raises(errors.TaskNotFound):
            await inspector.find_task("no-such-id")
        with pytest.raises(errors.TaskNotFound):
            await inspector.find_task(pending.id, ["q2"])  # not where it is


async def test_a_remembered_queue_list_never_hides_a_task_of_a_new_queue(
    redis: aioredis.Redis, clock: ManualClock, lane: FastLane,
) -> None:
    """The list of queues to search is kept QUEUE_LIST_TTL_S; a miss re-reads it, so a task of
    a queue created since is found at once, and the re-read list is kept."""
    client = Client(redis, clock=clock)
    inspector = Inspector(redis, clock=clock, lane=lane)
    first = await client.enqueue("a", b"1", queue="old")
    assert (await inspector.find_task(first.id)).queue == "old"
    later = await client.enqueue("a", b"2", queue="new")  # "new" is not in the kept list
    assert (await inspector.find_task(later.id)).queue == "new"
    await redis.srem(keys.ALL_QUEUES, "new")  # kept: searched without reading the set
    assert (await inspector.find_task(later.id)).queue == "new"
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task("missing")  # a miss re-reads: "new" is gone from it
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task(later.id)


async def test_find_task_with_returns_the_extra_replies_in_order(
    redis: aioredis.Redis, clock: ManualClock, lane: FastLane,
) -> None:
    client = Client(redis, clock=clock)
    inspector = Inspector(redis, clock=clock, lane=lane)
    info = await client.enqueue("a", b"1")
    await redis.hset(log_meta_key(info.id), mapping={"started_ms": 5, "finished_ms": 9})
    extra = Batch()
    extra.script("log_attempt_times", [log_meta_key(info.id), log_key(info.id)], [])
    extra.script("log_attempt_times", [log_meta_key("other"), log_key("other")], [])
    found, replies = await inspector.find_task_with(info.id, extra, ["log_attempt_times"])
    assert found.id == info.id
    assert replies == [[b"5", b"9"], [None, None]]
    await redis.script_flush()  # NOSCRIPT: loaded and sent again
    assert (await inspector.find_task_with(info.id, extra, ["log_attempt_times"]))[1] == replies


async def test_the_task_route_matches_no_id_with_braces(make_service: ServiceFactory) -> None:
    """GET /tasks/{id} reads the log stream and its meta hash in one script, which on a
    Cluster needs them in one slot: true of every id without "{" or "}", and the route takes
    no other (such an id is refused before any lookup)."""
    service = await make_service(worker=False)
    odd = "x}y"
    await service.state.client.enqueue("echo", b'{"name":"ada"}', queue="default",
                                       task_id=odd, headers=access_headers(()))
    for path in ("/tasks/x%7Dy", "/tasks/x%7By"):
        status, body, _ = await service.request("GET", path)
        assert (status, body["error"]["code"]) == (404, "not_found")
    assert keys.log_meta_key("abc") == "{logs:abc}:meta"  # the stream's name as the tag


async def test_lookups_that_find_the_queue_list_expired_read_it_once(
    redis: aioredis.Redis, clock: ManualClock, lane: FastLane,
) -> None:
    """Fifty GETs arriving as the list expires cost one SMEMBERS, not fifty (each of which
    took a connection of redis-py's pool)."""
    client = Client(redis, clock=clock)
    info = await client.enqueue("a", b"1", queue="q1")
    inspector = Inspector(redis, clock=clock, lane=lane)  # no list read yet
    await redis.config_resetstat()
    found = await asyncio.gather(*(inspector.find_task(info.id) for _ in range(50)))
    assert {f.id for f in found} == {info.id}
    stats = await redis.info("commandstats")
    assert stats["cmdstat_smembers"]["calls"] == 1


async def test_a_lookup_over_a_lane_whose_redis_is_gone_is_broker_unavailable(
    redis: aioredis.Redis, clock: ManualClock,
) -> None:
    """The lane's connection errors map as redis-py's do (GET answers 503, not 500)."""
    dead = FastLane("127.0.0.1", free_port(), connect_timeout_s=1.0)
    inspector = Inspector(redis, clock=clock, lane=dead)
    try:
        with pytest.raises(errors.BrokerUnavailable):
            await inspector.find_task("some-id", ["default"])
    finally:
        await dead.aclose()


@pytest.mark.parametrize(("raw", "refused"), [
    (b'{"name":"bench","times":1}', False),  # passes on the raw body, strings not blanked
    (b'{"n":"' + b"[" * 40 + b'"}', False),  # brackets only inside a string: blanked, passes
    (b'{"n":"' + b"9" * 80 + b'"}', False),  # digits only inside a string
    (b"[" * 33 + b"]" * 33, True),
    (b'{"n":"[[[[[[","m":' + b"[" * 32 + b"]" * 32 + b"}", True),
    (b'{"n":' + b"1" * 65 + b"}", True),
    (b'{"n":"x","m":' + b"1" * 65 + b"}", True),
])
def test_the_json_shape_check_is_decided_the_same_with_or_without_blanking(
        raw: bytes, refused: bool) -> None:
    """The raw-body pre-check only ever lets through what the full check lets through."""
    if refused:
        with pytest.raises(ApiError):
            check_json_shape(raw)
    else:
        check_json_shape(raw)


async def test_a_started_app_has_frozen_the_startup_heap(make_service: ServiceFactory) -> None:
    """The first app of a process moves what startup left (modules, configuration) into the
    collector's permanent generation, so full collections under load do not walk it."""
    await make_service(worker=False)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] >= YOUNG_GC_THRESHOLD
