"""A task as ``GET /tasks/{id}`` shows it: one place, so a webhook body is the same document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from aqsh.engine.connection import RedisClient
from aqsh.engine.keys import log_key, log_meta_key
from aqsh.engine.models import TaskInfo, TaskState
from aqsh.engine.task import CONTEXT_CANCELED
from aqsh.runner.result import decode_result
from aqsh.runner.spec import HEADER_SUBMITTED_AT, HEADER_SUBMITTED_BY

CANCELED = "canceled"
FINISHED = frozenset({TaskState.COMPLETED, TaskState.ARCHIVED})


def iso(unix_s: float | None) -> str | None:
    if not unix_s:
        return None
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


def links(task_id: str, base_url: str = "") -> dict[str, str]:
    return {"self": f"{base_url}/tasks/{task_id}", "logs": f"{base_url}/tasks/{task_id}/logs"}


def public_state(info: TaskInfo) -> str:
    """``canceled`` for an archived task that was cancelled: by its script's canceled result, or
    — cancelled before the script started (DELETE landing as the worker took it), or a Go
    server's task — by the attempt's error alone when no result was stored."""
    if info.state is TaskState.ARCHIVED:
        if not info.result:
            cancelled = info.message.error_msg in (CANCELED, CONTEXT_CANCELED)
            return CANCELED if cancelled else info.state.value
        try:
            if decode_result(info.result).error == CANCELED:
                return CANCELED
        except msgspec.DecodeError:
            pass
    return info.state.value


async def attempt_times(redis: RedisClient, task_id: str) -> tuple[int | None, int | None]:
    """Start of the first attempt and end of the last: kept by the log writer in the hash
    beside the log stream (they outlive markers the stream's cap trimmed); for logs written
    before that hash existed, from the stream's first and last markers."""
    return (await attempt_times_many(redis, [task_id]))[0]


async def attempt_times_many(redis: RedisClient, task_ids: list[str]
                             ) -> list[tuple[int | None, int | None]]:
    """``attempt_times`` of several tasks in one round trip."""
    if not task_ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hmget(log_meta_key(task_id), "started_ms", "finished_ms")
        pipe.xrange(log_key(task_id), count=1)
        pipe.xrevrange(log_key(task_id), count=1)
    replies = await pipe.execute()

    def ms(entries: Any, marker: bytes) -> int | None:
        if entries and marker in entries[0][1]:
            return int(entries[0][0].split(b"-")[0])
        return None

    out: list[tuple[int | None, int | None]] = []
    for i in range(len(task_ids)):
        (kept_start, kept_end), first, last = replies[3 * i: 3 * i + 3]
        if kept_start is not None:
            out.append((int(kept_start), int(kept_end) if kept_end is not None else None))
        else:
            out.append((ms(first, b"start"), ms(last, b"eof")))
    return out


def task_document(info: TaskInfo, started_ms: int | None, finished_ms: int | None,
                  *, base_url: str = "") -> dict[str, Any]:
    msg = info.message
    try:
        task_input: Any = msgspec.json.decode(msg.payload) if msg.payload else None
    except msgspec.DecodeError:
        task_input = None
    submitted_at_ns = int(msg.headers.get(HEADER_SUBMITTED_AT, "0") or 0)
    result: Any = None
    if info.result:
        try:
            result = msgspec.json.decode(info.result)
        except msgspec.DecodeError:
            result = {"raw": info.result.decode("utf-8", "replace")}
    return {
        "id": info.id,
        "name": info.type,
        "queue": info.queue,
        "state": public_state(info),
        "input": task_input,
        "submitted_by": msg.headers.get(HEADER_SUBMITTED_BY),
        "enqueued_at": iso(submitted_at_ns / 1e9),
        "started_at": iso(started_ms / 1000 if started_ms else None),
        "finished_at": iso(finished_ms / 1000 if finished_ms else None)
        if info.state in FINISHED else None,
        "next_process_at": iso(info.next_process_at_s)
        if info.state in (TaskState.SCHEDULED, TaskState.RETRY) else None,
        "retries": msg.retried,
        "max_retry": msg.retry,
        "last_error": msg.error_msg or None,
        "result": result,
        "links": links(info.id, base_url),
    }
