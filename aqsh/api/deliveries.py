"""``GET /tasks/{id}/deliveries`` and ``POST /tasks/{id}/deliveries/{delivery}/retry``.

Both answer exactly like reading the task: a caller who may not see the task gets the 404 of
an unknown id. A redelivery sends the delivery's stored body again under its webhook-id, with
a fresh retry schedule.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from aiohttp import web

from aqsh import errors
from aqsh.api.errors import ApiError
from aqsh.api.handlers import _find_authorized, _state
from aqsh.api.view import iso
from aqsh.engine.models import TaskState
from aqsh.webhooks import WEBHOOK_QUEUE, WEBHOOK_TASK_TYPE
from aqsh.webhooks.store import Attempt, Delivery, DeliveryMeta, attempts_key, deliveries_key

_STATE_NAMES = {
    TaskState.PENDING: "pending", TaskState.ACTIVE: "delivering",
    TaskState.SCHEDULED: "retrying", TaskState.RETRY: "retrying",
    TaskState.COMPLETED: "delivered",
}


async def list_deliveries(request: web.Request) -> web.Response:
    info, _, _ = await _find_authorized(request)
    state = _state(request)
    pipe = state.redis.pipeline(transaction=False)
    pipe.hgetall(deliveries_key(info.id))
    pipe.lrange(attempts_key(info.id), 0, -1)
    raw_metas, raw_attempts = await pipe.execute()
    attempts: dict[str, list[Attempt]] = {}
    for raw in raw_attempts:
        try:
            record = msgspec.json.decode(raw, type=Attempt)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        attempts.setdefault(record.delivery, []).append(record)
    metas: list[tuple[str, DeliveryMeta]] = []
    for key, raw in raw_metas.items():
        try:
            metas.append((key.decode() if isinstance(key, bytes) else str(key),
                          msgspec.json.decode(raw, type=DeliveryMeta)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    metas.sort(key=lambda item: (item[1].created_at, item[0]))
    out: list[dict[str, Any]] = []
    for did, meta in metas:
        tried = sorted(attempts.get(did, []), key=lambda a: (a.at, a.attempt))
        next_at: str | None = None
        try:
            task = await state.inspector.find_task(did, [WEBHOOK_QUEUE])
        except errors.TaskNotFound:
            status = "expired"
        else:
            if task.state is TaskState.ARCHIVED:
                last = tried[-1].outcome if tried else "failed"
                status = last if last in ("gone", "refused") else "failed"
            else:
                status = _STATE_NAMES.get(task.state, task.state.value)
            if task.state in (TaskState.RETRY, TaskState.SCHEDULED):
                next_at = iso(task.next_process_at_s)
        out.append({
            "id": did, "event": meta.event, "url": meta.url, "webhook_id": meta.webhook_id,
            "created_at": meta.created_at, "state": status, "next_attempt_at": next_at,
            "attempts": [msgspec.to_builtins(a) for a in tried],
        })
    return web.json_response({"task_id": info.id, "deliveries": out})


async def retry_delivery(request: web.Request) -> web.Response:
    info, _, _ = await _find_authorized(request)
    state = _state(request)
    did = request.match_info["delivery"]
    if not await state.redis.hexists(deliveries_key(info.id), did):
        raise ApiError(404, "delivery_not_found",
                       f"task {info.id} has no delivery {did!r}")
    try:
        delivery = await state.inspector.find_task(did, [WEBHOOK_QUEUE])
    except errors.TaskNotFound:
        raise ApiError(409, "delivery_expired", f"delivery {did} is no longer retained; "
                       "its body cannot be sent again") from None
    if delivery.state is TaskState.ACTIVE:
        raise ApiError(409, "delivery_in_progress", f"delivery {did} is being attempted now")
    if delivery.state is not TaskState.PENDING:
        # The same task id, payload (body, webhook-id) and a fresh schedule.
        await state.inspector.delete_task(WEBHOOK_QUEUE, did)
        settings = state.settings
        # The body it sent travels in the payload now (its result goes with the old task).
        payload = delivery.message.payload
        if delivery.result:
            try:
                stored = msgspec.json.decode(payload, type=Delivery)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise ApiError(409, "delivery_unreadable",
                               f"delivery {did} is not a webhook delivery") from None
            payload = msgspec.json.encode(msgspec.structs.replace(
                stored, body=delivery.result.decode()))
        # A TaskIdConflict: a concurrent redelivery (or a sweep) queued it first.
        with contextlib.suppress(errors.TaskIdConflict):
            await state.client.enqueue(
                WEBHOOK_TASK_TYPE, payload, queue=WEBHOOK_QUEUE,
                max_retry=len(settings.webhook_schedule_s) - 1,
                timeout=settings.webhook_timeout_s + 30, task_id=did,
                retention=settings.result_retention_s)
    return web.json_response({"id": did, "task_id": info.id, "state": "pending",
                              "links": {"deliveries": f"/tasks/{info.id}/deliveries"}},
                             status=202)
