"""GET /tasks/{id}/logs: replay the log stream, then follow it live.

Each client reads the stream on its own (``XREAD BLOCK`` from its last id), so followers share
no state and every one resumes exactly where its ``Last-Event-ID`` says. The stream's own entry
ids are the SSE ids. ``event: eof`` (data = the exit code) ends the stream once the task's last
attempt finished; a task that will be retried keeps its followers through the next attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from aqsh.api.errors import ApiError
from aqsh.engine.connection import RedisClient
from aqsh.runner.logs import log_key

#: How long one XREAD blocks before the follower checks whether the task is still alive.
BLOCK_MS = 10_000
BATCH = 500
STREAM_ID_CHARS = set("0123456789-")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def start_id(request: web.Request) -> str:
    """Last-Event-ID header (browser reconnects) or ``?last_event_id=``; else the start."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0-0"
    raw = raw.strip()
    if not raw or not set(raw) <= STREAM_ID_CHARS or raw.count("-") > 1:
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID must be a stream id like 1-0")
    return raw


async def plain_logs(redis: RedisClient, task_id: str, after: str) -> web.Response:
    """``?follow=false``: what exists now, one line per line, as text/plain."""
    lines: list[str] = []
    cursor = f"({after}" if after != "0-0" else "-"
    while True:
        entries: Any = await redis.xrange(log_key(task_id), min=cursor, max="+", count=5000)
        for _, fields in entries:
            if b"line" in fields:
                lines.append(_text(fields[b"line"]))
        if len(entries) < 5000:
            break
        cursor = f"({_text(entries[-1][0])}"
    body = "\n".join(lines) + ("\n" if lines else "")
    return web.Response(text=body, content_type="text/plain", charset="utf-8")


async def follow_logs(
    request: web.Request,
    redis: RedisClient,
    task_id: str,
    after: str,
    task_finished: Callable[[], Awaitable[bool]],
    on_open: Callable[[], None],
    on_close: Callable[[], None],
) -> web.StreamResponse:
    key = log_key(task_id)
    last = after
    #: The newest eof marker with nothing after it: the end, unless the task runs again.
    pending_eof: tuple[str, str] | None = None
    on_open()
    try:
        async with sse_response(request, ping_interval=15) as response:
            while response.is_connected():
                # Right after an eof marker the task's final state lands within milliseconds
                # (the ack follows the script's exit); poll briefly instead of blocking long.
                block_ms = 200 if pending_eof else BLOCK_MS
                reply: Any = await redis.xread({key: last}, count=BATCH, block=block_ms)
                if not reply:
                    if await task_finished():
                        eof_id, code = pending_eof or (None, "")
                        await response.send(code, id=eof_id, event="eof")
                        break
                    continue
                pending_eof = None
                for raw_id, fields in reply[0][1]:
                    last = _text(raw_id)
                    if b"line" in fields:
                        await response.send(_text(fields[b"line"]), id=last)
                        pending_eof = None
                    elif b"eof" in fields:
                        pending_eof = (last, _text(fields.get(b"exit_code", b"")))
                    elif b"start" in fields:
                        pending_eof = None
        return response
    finally:
        on_close()


