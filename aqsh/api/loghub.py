"""LogHub: one ``XREAD BLOCK`` for every log stream this process's SSE clients follow.

Without it every follower blocks on a Redis connection of its own: a thousand viewers are a
thousand Redis connections per API replica, and a line followed by N clients is read N times.
The hub reads each followed stream once, from the oldest position any of its followers still
needs, and hands every follower the entries newer than its own last id — so followers stay
independent (each resumes exactly from its ``Last-Event-ID``) while Redis sees one reader.

A follower first catches up on its own (``XRANGE``, no blocking) and then joins at its last id.
A follower that falls more than ``queue_limit`` batches or ``max_bytes`` of entries behind (a
slow client) is dropped from the hub, told so, and catches up on its own again before
rejoining: a slow client never holds unbounded memory or delays the others.

The hub's read loop is supervised: a failed read (Redis away, an error reply) is logged, backed
off with jitter and retried for as long as anyone follows, and every follower is woken so it
can check on its own whether Redis answers (``aqsh.api.sse`` decides when to give up).

All keys of one ``XREAD`` must share a slot on a Redis Cluster, so there followers keep reading
on their own (``aqsh.api.sse``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from aqsh.clock import finish
from aqsh.engine.faults import Backoff, LoopMonitor
from aqsh.engine.rdb import REDIS_DOWN

log = structlog.get_logger("aqsh.api")

Entry = tuple[str, dict[bytes, Any]]
BLOCK_MS = 10_000
BATCH = 1000
QUEUE_LIMIT = 100  # batches of up to BATCH entries
#: What one follower may have waiting (ids, field names and values, counted as bytes).
FOLLOWER_MAX_BYTES = 8 * 1024 * 1024
#: The supervised loop's name in logs.
LOOP_NAME = "sse_hub"
_FIRST_RETRY_S = 0.1
_LONGEST_RETRY_S = 2.0


def stream_id(text: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence), not as text."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Follower:
    """One SSE client's place in one stream; ``take`` gives what the hub delivered to it."""

    def __init__(self, key: str, last: str, queue_limit: int,
                 max_bytes: int = FOLLOWER_MAX_BYTES) -> None:
        self.key = key
        self.last = stream_id(last)
        self.entries: asyncio.Queue[list[Entry]] = asyncio.Queue(maxsize=queue_limit)
        self.max_bytes = max_bytes
        #: Bytes of the batches waiting in ``entries``, each batch's size kept in ``_sizes``.
        self.queued_bytes = 0
        self._sizes: deque[int] = deque()
        #: Set when the hub dropped this follower for falling behind: catch up, then rejoin.
        self.dropped = False

    def offer(self, batch: list[Entry], size: int) -> bool:
        """Queue a batch unless that would pass either bound; False: too far behind."""
        if self.queued_bytes + size > self.max_bytes and self._sizes:
            return False
        try:
            self.entries.put_nowait(batch)
        except asyncio.QueueFull:
            return False
        self._sizes.append(size)
        self.queued_bytes += size
        return True

    def wake(self) -> None:
        """An empty batch: the hub's read failed; the follower should look for itself."""
        if not self.entries.full():
            self.offer([], 0)

    async def take(self, timeout_s: float) -> list[Entry]:
        """The next batch, ``[]`` for a wake-up; TimeoutError after ``timeout_s`` of nothing."""
        # wait_for, not asyncio.timeout: the get runs as a task of its own, and the hub's
        # ordering between a read's delivery and a follower joining behind depends on it
        # (tests/api/test_loghub.py). A take is cancelled only when its client has gone.
        batch = await asyncio.wait_for(self.entries.get(), timeout_s)
        self.queued_bytes -= self._sizes.popleft()
        return batch


def entry_size(entry: Entry) -> int:
    entry_id, fields = entry
    return len(entry_id) + sum(len(name) + len(value) for name, value in fields.items())


class LogHub:
    def __init__(self, redis: aioredis.Redis, *, block_ms: int = BLOCK_MS, batch: int = BATCH,
                 queue_limit: int = QUEUE_LIMIT, follower_max_bytes: int = FOLLOWER_MAX_BYTES,
                 monitor: LoopMonitor | None = None) -> None:
        """``monitor``: where the read loop records its cycles and failures (the health
        endpoints and ``aqsh_loop_errors_total``); parked while nobody follows."""
        self.redis = redis
        self.monitor = monitor
        if monitor is not None:
            monitor.parked = True
        self.block_ms = block_ms
        self.batch = batch
        self.queue_limit = queue_limit
        self.follower_max_bytes = follower_max_bytes
        self._followers: dict[str, set[Follower]] = {}
        #: Per stream, the id after which the hub reads next.
        self._cursor: dict[str, tuple[int, int]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: XREAD calls made (for tests and tuning: one per batch of news, not per follower).
        self.reads = 0
        #: XREAD calls that failed (and were retried).
        self.read_failures = 0

    def join(self, key: str, last: str) -> Follower:
        follower = Follower(key, last, self.queue_limit, self.follower_max_bytes)
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
            await finish(self._task)
            self._task = None

    async def _run(self) -> None:
        """Supervised: a failure of one round is logged and backed off, never the hub's end
        (it ends only when nobody follows; ``join`` starts it again)."""
        backoff = Backoff(_FIRST_RETRY_S, _LONGEST_RETRY_S)
        if self.monitor is not None:
            self.monitor.parked = False
        try:
            while self._followers:
                try:
                    await self._read_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away, an error reply, a bug: never hang anyone
                    self.read_failures += 1
                    if self.monitor is not None:
                        self.monitor.failed(exc)  # logs it with the loop's name and kind
                    else:
                        log.warning("sse.hub_read_failed", loop=LOOP_NAME,
                                    error=str(exc) or type(exc).__name__)
                    for follower in itertools.chain.from_iterable(self._followers.values()):
                        follower.wake()
                    await asyncio.sleep(backoff.next_delay_s())
                    continue
                backoff.reset()
                if self.monitor is not None:
                    self.monitor.ok()
        finally:
            if self.monitor is not None:
                self.monitor.parked = True  # nobody to read for: waiting is not a stall

    async def _read_once(self) -> None:
        """One XREAD for every followed stream, its news handed out; raises what the read
        raised. A change of followers interrupts it (the caller reads again at once)."""
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
            return
        reply: Any = read.result()
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
        # Sizes once per read, not per follower: a follower's share is a suffix of the batch.
        ends = list(itertools.accumulate(entry_size(entry) for entry in entries))
        for follower in list(self._followers[key]):
            if follower.last < read_from:
                continue
            start = bisect.bisect_right(ids, follower.last)
            if start == len(entries):
                continue
            size = ends[-1] - (ends[start - 1] if start else 0)
            if not follower.offer(list(entries[start:]), size):
                follower.dropped = True
                self.leave(follower)
                continue
            follower.last = ids[-1]
