"""A DELETE that lands between a run's end and its acknowledgement must say what really
happened: the task completed, so 409 — not 202 "canceling" for a task that then completes."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from tests.api.conftest import ServiceFactory, make_service  # noqa: F401 — the fixture
from tests.faults.test_shutdown import GatedAcks

Q = keys.queue_keys("default")


async def test_a_cancel_that_loses_the_race_with_completion_answers_409(
    make_service: ServiceFactory, redis: aioredis.Redis  # noqa: F811
) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    assert status == 202

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return b'{"exit_code": 0}'

    broker = GatedAcks(redis)
    worker = Server(broker, handler, queues={"default": 1})
    cancels: list[str] = []
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.CANCEL_CHANNEL)
    await worker.start()
    try:
        await asyncio.wait_for(broker.waiting.wait(), 10)  # ran; its ack is held
        delete = asyncio.create_task(service.request("DELETE", f"/tasks/{body['id']}"))
        while not cancels:  # the API has published the cancel: the run ignores it (done)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            if message is not None:
                cancels.append(message["data"].decode())
        broker.gate.set()
        status, answer, _ = await asyncio.wait_for(delete, 10)
    finally:
        broker.gate.set()
        await worker.stop(shutdown_timeout_s=1)
        await pubsub.aclose()
    assert cancels == [body["id"]]
    assert status == 409, answer
    assert answer["error"]["code"] == "task_finished"
    assert answer["error"]["details"]["state"] == "completed"
    got = await service.request("GET", f"/tasks/{body['id']}")
    assert got[1]["state"] == "completed"
