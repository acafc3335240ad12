"""LogHub: one ``XREAD BLOCK`` for every log stream this process's SSE clients follow.

Without it every follower blocks on a Redis connection of its own: a thousand viewers are a
thousand Redis connections per API replica, and a line followed by N clients is read N times.
The hub reads each followed stream once, from the oldest position any of its followers still
needs, and hands every follower the entries newer than its own last id — so followers stay
independent (each resumes exactly from its ``Last-Event-ID``) while Redis sees one reader.

A follower first catches up on its own (``XRANGE``, no blocking) and then joins at its last id.
A follower that falls more than ``queue_limit`` batches behind (a slow client) is dropped from
the hub, told so, and catches up on its own again before rejoining: a slow client never holds
unbounded memory or delays the others.

All keys of one ``XREAD`` must share a slot on a Redis Cluster, so there followers keep reading
on their own (``aqsh.api.sse``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from aqsh.engine.rdb import REDIS_DOWN

log = structlog.get_logger("aqsh.api")

Entry = tuple[str, dict[bytes, Any]]
BLOCK_MS = 10_000
BATCH = 1000
QUEUE_LIMIT = 100  # batches of up to BATCH entries
_RETRY_AFTER_FAILURE_S = 0.5


def stream_id(text: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence), not as text."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Follower:
    """One SSE client's place in one stream; ``entries`` is what the hub delivered to it."""

    def __init__(self, key: str, last: str, queue_limit: int) -> None:
        self.key = key
        self.last = stream_id(last)
        self.entries: asyncio.Queue[list[Entry]] = asyncio.Queue(maxsize=queue_limit)
        #: Set when the hub dropped this follower for falling behind: catch up, then rejoin.
        self.dropped = False


class LogHub:
    def __init__(self, redis: aioredis.Redis, *, block_ms: int = BLOCK_MS, batch: int = BATCH,
                 queue_limit: int = QUEUE_LIMIT) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.batch = batch
        self.queue_limit = queue_limit
        self._followers: dict[str, set[Follower]] = {}
        #: Per stream, the id after which the hub reads next.
        self._cursor: dict[str, tuple[int, int]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: XREAD calls made (for tests and tuning: one per batch of news, not per follower).
        self.reads = 0

    def join(self, key: str, last: str) -> Follower:
        follower = Follower(key, last, self.queue_limit)
        followers = self._followers.setdefault(key, set())
        followers.add(follower)
        cursor = self._cursor.get(key)
        if cursor is None or follower.last < cursor:
            self._cursor[key] = follower.last  # read again from where this one is
            self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="aqsh-log-hub")
        return follower

    def leave(self, follower: Follower) -> None:
        followers = self._followers.get(follower.key)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            # No wake-up: the read under way may keep the stream until it returns (its news for
            # nobody is dropped); interrupting it would cost a reconnect per departing viewer.
            del self._followers[follower.key]
            self._cursor.pop(follower.key, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while self._followers:
            self._changed.clear()
            streams = {key: format_id(self._cursor[key]) for key in self._followers}
            read = asyncio.ensure_future(self.redis.xread(
                streams, count=self.batch, block=self.block_ms))  # type: ignore[arg-type]
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({read, changed}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the hub is closing: take the read down with it
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await read
                raise
            finally:
                changed.cancel()
            if not read.done():
                # Someone joined behind the cursor or a stream came or went: read again with
                # the new set. (redis-py drops a connection cancelled mid-read; the pool makes
                # a new one.)
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
                    await read
                continue
            try:
                reply: Any = read.result()
            except Exception as exc:  # Redis away, or anything else: followers must not hang
                log.warning("sse.hub_read_failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(_RETRY_AFTER_FAILURE_S)
                continue
            self.reads += 1
            for raw_key, raw_entries in reply or []:
                key = _text(raw_key)
                self._deliver(key, [(_text(i), f) for i, f in raw_entries],
                              read_from=stream_id(streams[key]))

    def _deliver(self, key: str, entries: Sequence[Entry], *, read_from: tuple[int, int]) -> None:
        """Hand out what one read of ``key`` (after ``read_from``) returned.

        A follower that joined behind ``read_from`` while the read was under way needs older
        entries first: it gets nothing now, and the cursor stays where its join put it, so the
        next read starts there (the others skip what they already have).
        """
        if not entries or key not in self._followers:
            return
        newest = stream_id(entries[-1][0])
        if self._cursor.get(key) == read_from:
            self._cursor[key] = newest
        ids = [stream_id(entry_id) for entry_id, _ in entries]
        for follower in list(self._followers[key]):
            if follower.last < read_from:
                continue
            fresh = [entry for entry, at in zip(entries, ids, strict=True) if at > follower.last]
            if not fresh:
                continue
            try:
                follower.entries.put_nowait(fresh)
            except asyncio.QueueFull:
                follower.dropped = True
                self.leave(follower)
                continue
            follower.last = ids[-1]
