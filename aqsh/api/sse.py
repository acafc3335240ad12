"""GET /tasks/{id}/logs: replay the log stream, then follow it live.

Every follower resumes exactly where its ``Last-Event-ID`` says: it replays from there on its
own, then takes the live part from the process's shared reader (``aqsh.api.loghub``; on a
Cluster it keeps reading alone with ``XREAD BLOCK``). The stream's own entry
ids are the SSE ids. ``event: eof`` (data = the exit code) ends the stream once the task's last
attempt finished; a task that will be retried keeps its followers through the next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from aqsh.api.errors import ApiError
from aqsh.api.loghub import LogHub
from aqsh.engine.connection import RedisClient
from aqsh.engine.keys import log_key

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


class _Cursor:
    """A follower's position and the eof marker that may end its stream."""

    def __init__(self, after: str) -> None:
        self.last = after
        #: The newest eof marker with nothing after it: the end, unless the task runs again.
        self.pending_eof: tuple[str, str] | None = None

    async def send(self, response: Any, entries: Any) -> None:
        for raw_id, fields in entries:
            self.last = _text(raw_id)
            if b"line" in fields:
                await response.send(_text(fields[b"line"]), id=self.last)
                self.pending_eof = None
            elif b"eof" in fields:
                self.pending_eof = (self.last, _text(fields.get(b"exit_code", b"")))
            elif b"start" in fields:
                self.pending_eof = None

    def wait_s(self) -> float:
        # Right after an eof marker the task's final state lands within milliseconds (the ack
        # follows the script's exit); check briefly instead of waiting long.
        return 0.2 if self.pending_eof else BLOCK_MS / 1000

    async def end(self, response: Any) -> None:
        eof_id, code = self.pending_eof or (None, "")
        await response.send(code, id=eof_id, event="eof")


async def follow_logs(
    request: web.Request,
    redis: RedisClient,
    task_id: str,
    after: str,
    task_finished: Callable[[], Awaitable[bool]],
    on_open: Callable[[], None],
    on_close: Callable[[], None],
    hub: LogHub | None = None,
) -> web.StreamResponse:
    """With a ``hub`` (standalone Redis) the live part comes from the process's one shared
    reader; without (Cluster) this follower blocks on a connection of its own."""
    key = log_key(task_id)
    cursor = _Cursor(after)
    on_open()
    try:
        async with sse_response(request, ping_interval=15) as response:
            if hub is None:
                await _follow_alone(response, redis, key, cursor, task_finished)
            else:
                await _follow_with_hub(response, redis, hub, key, cursor, task_finished)
        return response
    finally:
        on_close()


async def _follow_alone(response: Any, redis: RedisClient, key: str, cursor: _Cursor,
                        task_finished: Callable[[], Awaitable[bool]]) -> None:
    while response.is_connected():
        reply: Any = await redis.xread({key: cursor.last}, count=BATCH,
                                       block=int(cursor.wait_s() * 1000))
        if reply:
            await cursor.send(response, reply[0][1])
        elif await task_finished():
            await cursor.end(response)
            return


async def _follow_with_hub(response: Any, redis: RedisClient, hub: LogHub, key: str,
                           cursor: _Cursor, task_finished: Callable[[], Awaitable[bool]]) -> None:
    while response.is_connected():
        # Catch up on our own (no blocking), then let the hub bring what comes next.
        while True:
            start = f"({cursor.last}" if cursor.last != "0-0" else "-"
            entries: Any = await redis.xrange(key, min=start, max="+", count=BATCH)
            await cursor.send(response, entries)
            if len(entries) < BATCH:
                break
        follower = hub.join(key, cursor.last)
        try:
            while response.is_connected():
                if follower.dropped and follower.entries.empty():
                    break  # too slow for the hub: catch up alone, then rejoin
                try:
                    batch = await asyncio.wait_for(follower.entries.get(), cursor.wait_s())
                except TimeoutError:
                    if await task_finished():
                        await cursor.end(response)
                        return
                    continue
                await cursor.send(response, batch)
        finally:
            hub.leave(follower)
