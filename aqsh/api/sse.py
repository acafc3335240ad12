"""GET /tasks/{id}/logs: replay the log stream, then follow it live.

Every follower resumes exactly where its ``Last-Event-ID`` says: it replays from there on its
own, then takes the live part from the process's shared reader (``aqsh.api.loghub``; on a
Cluster it keeps reading alone with ``XREAD BLOCK``). The stream's own entry ids are the SSE
ids. ``event: eof`` (data = the exit code) ends the stream once the task's last attempt
finished; a task that will be retried keeps its followers through the next attempt.

Entry ids are ``<ms>-<n>``, ``n`` counting the stream's entries (``lua/append_log_lines.lua``):
when ``n`` jumps, the stream's length cap trimmed entries this follower never saw, and it gets
``event: gap`` (data ``{"lost": <count>}``) before the next line. ``?follow=false`` writes a
``[aqsh] <count> log lines lost ...`` line at that place instead.

``?stderr=event`` (the console asks for it) sends stderr lines as ``event: stderr`` instead of
the default message event, so a page can mark them; without it every line is a message, as
before (clients that listen only to messages keep every line).

Faults: once the stream has started, nothing but SSE goes out (a second HTTP response inside
the open stream is what a failure used to produce). A follower whose Redis calls fail keeps
retrying — pings keep flowing — for up to ``OUTAGE_GRACE_S``; then it sends ``event: error``
(data ``{"code", "message", "retry_ms"}``, with an SSE ``retry:`` hint) and ends the stream
cleanly, and a reconnect with ``Last-Event-ID`` resumes with no gap. A client that goes away is
no error (logged at debug).

Bounds: at most ``max_clients`` followers per process (503 with ``Retry-After`` beyond, before
the stream starts); ``?follow=false`` streams the log in pages, in constant memory.
"""

from __future__ import annotations

import asyncio
import random
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from redis.exceptions import RedisError

from aqsh import errors
from aqsh.api.errors import ApiError, error_response
from aqsh.api.loghub import (
    KEEP,
    Frames,
    LogHub,
    Share,
    encode_event,
    format_id,
    lost_between,
)
from aqsh.engine.connection import RedisClient
from aqsh.engine.keys import log_key

log = structlog.get_logger("aqsh.api")
T = TypeVar("T")

#: How long one XREAD blocks before the follower checks whether the task is still alive.
BLOCK_MS = 10_000
BATCH = 500
#: ``?follow=false`` reads and writes the log this many entries at a time.
PAGE = 1000
#: How long a follower keeps retrying a failing Redis before it ends with ``event: error``.
#: Read at call time (tests shorten it).
OUTAGE_GRACE_S = 30.0
#: The reconnect delay suggested to clients after ``event: error`` (SSE ``retry:``, ms).
RETRY_MS = 5000
PING_INTERVAL_S = 15.0
#: A client that accepts nothing for this long is cut off (aiohttp_sse also sets it as the
#: socket's TCP_USER_TIMEOUT, so a vanished peer is noticed as well).
SEND_TIMEOUT_S = 60.0
DEFAULT_MAX_CLIENTS = 1000
MAX_ID_PART = 2**64 - 1


def _at_most(limit: int) -> str:
    """A regex of the decimal numbers 0..limit (leading zeros allowed, no more digits than
    limit has): any shorter digit string, or one as long that is not above it, digit by digit."""
    digits = str(limit)
    options = [digits] + ([f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else [])
    for i, digit in enumerate(digits):
        if digit != "0":
            below = "0" if digit == "1" else f"[0-{int(digit) - 1}]"
            rest = len(digits) - i - 1
            options.append(digits[:i] + below + (f"[0-9]{{{rest}}}" if rest else ""))
    return "(?:" + "|".join(options) + ")"


_PART = _at_most(MAX_ID_PART)
#: What a cursor may be, exactly (the OpenAPI document publishes it): <ms>-<seq>, or <ms> as
#: Redis reads it (<ms>-0), each part at most 2**64-1.
STREAM_ID_PATTERN = f"^{_PART}(?:-{_PART})?$"
_STREAM_ID = re.compile(f"({_PART})(?:-({_PART}))?")
#: What a failing Redis call raises here (redis-py directly, or the engine's wrappers).
_REDIS_FAULTS = (RedisError, OSError, errors.BrokerUnavailable, errors.BrokerFault)
_CLIENT_GONE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_stream_id(text: str) -> tuple[int, int] | None:
    """``<ms>-<seq>`` (or ``<ms>``, as Redis reads it: ``<ms>-0``), both parts at most
    2**64-1; None when ``text`` is not a stream id."""
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        return None
    return int(match[1]), int(match[2] or 0)


def start_id(request: web.Request) -> str:
    """Last-Event-ID header (browser reconnects) or ``?last_event_id=``; else the start.
    Anything but a stream id (an empty value too) is a 400, before any stream starts."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id", "0-0")
    parsed = parse_stream_id(raw)
    if parsed is None:
        raise ApiError(400, "bad_last_event_id",
                       "Last-Event-ID must be a stream id <ms>-<seq> like 1700000000000-1, "
                       "each part at most 18446744073709551615",
                       details={"last_event_id": raw[:64]})
    return format_id(parsed)


def _id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _next_id(after: tuple[int, int]) -> str | None:
    """The smallest id after ``after`` (an inclusive XRANGE start: ``(`` of the largest id is
    an error in Redis 6.2), or None when no id can follow."""
    ms, seq = after
    if seq < MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    if ms < MAX_ID_PART:
        return f"{ms + 1}-0"
    return None


async def _page(redis: RedisClient, key: str, after: tuple[int, int], count: int) -> Any:
    start = _next_id(after)
    if start is None:
        return []
    return await redis.xrange(key, min=start, max="+", count=count)


def _lost_line(count: int) -> str:
    return f"[aqsh] {count} log lines lost: trimmed by the log's length cap before they were read"


# ------------------------------------------------------------------------- ?follow=false
async def plain_logs(request: web.Request, redis: RedisClient, task_id: str,
                     after: str) -> web.StreamResponse:
    """``?follow=false``: what exists now, one line per line, as text/plain, written page by
    page. The first page is read before the response starts, so a Redis that is away then
    gets the usual 503; one that fails later ends the text with a line saying so."""
    key = log_key(task_id)
    position = _id(after)
    entries: Any = await _page(redis, key, position, PAGE)
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        while True:
            chunk: list[str] = []
            for raw_id, fields in entries:
                at = _id(_text(raw_id))
                lost = lost_between(position, at)
                if lost:
                    chunk.append(_lost_line(lost))
                position = at
                if b"line" in fields:
                    chunk.append(_text(fields[b"line"]))
            if chunk:
                await response.write(("\n".join(chunk) + "\n").encode())
            if len(entries) < PAGE:
                break
            try:
                entries = await _page(redis, key, position, PAGE)
            except _REDIS_FAULTS as exc:
                log.warning("sse.plain_read_failed", key=key, error=str(exc) or repr(exc))
                await response.write(b"[aqsh] log incomplete: the task store became "
                                     b"unreachable; retry later\n")
                break
        await response.write_eof()
    except _CLIENT_GONE:
        log.debug("sse.client_left", key=key)
    return response


# ------------------------------------------------------------------------- follow
class _Slots:
    """Open followers of one application (one process serves one)."""

    def __init__(self) -> None:
        self.open = 0


_SLOTS: weakref.WeakKeyDictionary[web.Application, _Slots] = weakref.WeakKeyDictionary()


def open_followers(app: web.Application) -> int:
    slots = _SLOTS.get(app)
    return slots.open if slots is not None else 0


class _Unavailable(Exception):
    """Redis kept failing for longer than the grace period."""


class _Follow:
    """One follower: its position, the eof marker that may end its stream, and its patience
    with a failing Redis."""

    def __init__(self, request: web.Request, response: EventSourceResponse, redis: RedisClient,
                 key: str, after: str, task_finished: Callable[[], Awaitable[bool]],
                 grace_s: float) -> None:
        self.request = request
        self.response = response
        self.redis = redis
        self.key = key
        self.last = _id(after)
        self.task_finished = task_finished
        self.grace_s = grace_s
        #: The newest eof marker with nothing after it: the end, unless the task runs again.
        self.pending_eof: tuple[str, str] | None = None
        self._failing_since: float | None = None
        self.mark_stderr = request.query.get("stderr") == "event"

    def connected(self) -> bool:
        """False once the client is gone: the ping task notices only at its next write, the
        transport as soon as the connection is lost (the follower's slot is freed sooner)."""
        transport = self.request.transport
        return (self.response.is_connected() and transport is not None
                and not transport.is_closing())

    async def write(self, data: bytes) -> None:
        """``EventSourceResponse.send`` for bytes encoded already: the same send timeout (a
        client that takes nothing for that long is cut off) and the same stop on a reset."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await self.response.write(data)
        except ConnectionResetError:
            self.response.stop_streaming()
            raise
        except TimeoutError:
            self.response.stop_streaming()
            transport = self.request.transport
            if transport is not None:
                transport.abort()  # a stalled peer never drains: closing would wait forever
            raise

    async def deliver(self, shares: list[Share]) -> None:
        """Shares, in order, in one write; the position and eof marker move with them."""
        out: list[bytes] = []
        for share in shares:
            if share.last <= self.last:
                continue  # never twice, never backwards
            if share.data:
                out.append(share.data)
            self.last = share.last
            if share.ending is not KEEP:
                self.pending_eof = share.ending
        if out:
            await self.write(out[0] if len(out) == 1 else b"".join(out))

    def write_now(self, share: Share) -> bool:
        """The hub's fast path, run in its loop for each follower of a read: the share goes on
        the wire at once when that cannot block — the socket's buffer has room for it, so there
        is no drain to wait out and no send timeout to run — and it brings no eof marker (the
        follower's task must see one to shorten its wait). Else False: it is queued and the
        follower's task writes it."""
        if share.ending is not KEEP and share.ending is not None:
            return False
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return False
        writer = self.request.writer
        data = share.chunk() if getattr(writer, "chunked", False) else share.data
        if transport.get_write_buffer_size() + len(data) > transport.get_write_buffer_limits()[1]:
            return False
        if share.last > self.last:
            if share.data:  # (an empty chunk would be the chunked body's end: a start marker)
                transport.write(data)
                writer.buffer_size += len(data)  # aiohttp's own accounting: drains, access log
                writer.output_size += len(data)
            self.last = share.last
            if share.ending is None:
                self.pending_eof = None
        return True

    async def send(self, entries: Any) -> None:
        """Entries this follower read itself (a replay, or a Cluster's own XREAD)."""
        if entries:
            share = Frames([(_text(i), f) for i, f in entries]).share(self.last,
                                                                       self.mark_stderr)
            if share is not None:
                await self.deliver([share])

    def wait_s(self) -> float:
        # Right after an eof marker the task's final state lands within milliseconds (the ack
        # follows the script's exit); check briefly instead of waiting long.
        return 0.2 if self.pending_eof else BLOCK_MS / 1000

    async def end(self) -> None:
        eof_id, code = self.pending_eof or (None, "")
        await self.write(encode_event(code, id=eof_id, event="eof"))

    async def patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call``, retried with jittered back-off while Redis fails, for up to the grace
        period counted from the first of consecutive failures; then _Unavailable."""
        loop = asyncio.get_running_loop()
        delay_s = 0.1
        while True:
            try:
                value = await call()
            except _REDIS_FAULTS as exc:
                now = loop.time()
                if self._failing_since is None:
                    self._failing_since = now
                    log.warning("sse.redis_failed", key=self.key, error=str(exc) or repr(exc))
                if now - self._failing_since >= self.grace_s:
                    raise _Unavailable(str(exc) or type(exc).__name__) from exc
                await asyncio.sleep(delay_s * (0.5 + random.random() / 2))
                delay_s = min(delay_s * 2, 2.0)
                continue
            if self._failing_since is not None:
                log.info("sse.redis_back", key=self.key,
                         after_s=round(loop.time() - self._failing_since, 3))
                self._failing_since = None
            return value

    async def catch_up(self) -> None:
        """Replay on our own (no blocking) up to the stream's end."""
        while True:
            entries: Any = await self.patiently(lambda: _page(self.redis, self.key, self.last,
                                                              BATCH))
            await self.send(entries)
            if len(entries) < BATCH:
                return

    async def alone(self) -> None:
        while self.connected():
            reply: Any = await self.patiently(lambda: self.redis.xread(
                {self.key: format_id(self.last)}, count=BATCH, block=int(self.wait_s() * 1000)))
            if reply:
                await self.send(reply[0][1])
            elif await self.patiently(self.task_finished):
                await self.end()
                return

    async def with_hub(self, hub: LogHub) -> None:
        while self.connected():
            # Catch up on our own, then let the hub bring what comes next.
            await self.catch_up()
            follower = hub.join(self.key, format_id(self.last), marked=self.mark_stderr,
                                direct=self.write_now)
            try:
                while self.connected():
                    if follower.dropped and not follower.waiting:
                        break  # too slow for the hub: catch up alone, then rejoin
                    before = self.last
                    try:
                        batch = await follower.take(self.wait_s())
                    except TimeoutError:
                        batch = []
                    if batch:
                        await self.deliver(batch)
                        continue
                    if self.last != before:
                        continue  # the hub wrote for us meanwhile: not quiet
                    # Quiet for a while, or the hub's read failed: look for ourselves (this
                    # also tells a Redis that is back from one that is still away).
                    if await self.patiently(self.task_finished):
                        hub.leave(follower)  # nothing from the hub after the eof event
                        await self.catch_up()  # anything the hub had not brought yet
                        await self.end()
                        return
            finally:
                hub.leave(follower)


async def follow_logs(
    request: web.Request,
    redis: RedisClient,
    task_id: str,
    after: str,
    task_finished: Callable[[], Awaitable[bool]],
    on_open: Callable[[], None],
    on_close: Callable[[], None],
    hub: LogHub | None = None,
    *,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> web.StreamResponse:
    """With a ``hub`` (standalone Redis) the live part comes from the process's one shared
    reader; without (Cluster) this follower blocks on a connection of its own."""
    slots = _SLOTS.setdefault(request.app, _Slots())
    if slots.open >= max_clients:
        log.warning("sse.refused", open=slots.open, limit=max_clients)
        return error_response(503, "too_many_followers",
                              f"this server already streams {max_clients} logs; retry later",
                              headers={"Retry-After": "5"})
    key = log_key(task_id)
    response = EventSourceResponse(ping_interval=PING_INTERVAL_S, send_timeout=SEND_TIMEOUT_S)
    slots.open += 1
    on_open()
    try:
        await response.prepare(request)
        async with response:
            follow = _Follow(request, response, redis, key, after, task_finished, OUTAGE_GRACE_S)
            try:
                if hub is None:
                    await follow.alone()
                else:
                    await follow.with_hub(hub)
            except _Unavailable as exc:
                log.warning("sse.ended_by_outage", key=key, error=str(exc))
                await _farewell(response, "redis_unavailable",
                                "the task store is unreachable; reconnect with Last-Event-ID")
            except (*_CLIENT_GONE, TimeoutError) as exc:  # gone, or too slow to take a line
                log.debug("sse.client_left", key=key, reason=repr(exc), exc_info=True)
            except Exception:
                log.exception("sse.failed", key=key)
                await _farewell(response, "internal", "internal server error")
        return response
    except _CLIENT_GONE:  # gone before the stream started
        log.debug("sse.client_left", key=key)
        return response
    finally:
        slots.open -= 1
        on_close()


async def _farewell(response: EventSourceResponse, code: str, message: str) -> None:
    """The last event of a stream that cannot go on; the client may be gone already."""
    data = msgspec.json.encode({"code": code, "message": message, "retry_ms": RETRY_MS})
    try:
        await response.send(data.decode(), event="error", retry=RETRY_MS)
    except (*_CLIENT_GONE, TimeoutError, RuntimeError):
        log.debug("sse.client_left", key=None)
