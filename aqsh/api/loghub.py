"""LogHub: one ``XREAD BLOCK`` for every log stream this process's SSE clients follow.

Without it every follower blocks on a Redis connection of its own: a thousand viewers are a
thousand Redis connections per API replica, and a line followed by N clients is read N times.
The hub reads each followed stream once, from the oldest position any of its followers still
needs, and hands every follower the entries newer than its own last id — so followers stay
independent (each resumes exactly from its ``Last-Event-ID``) while Redis sees one reader.

Each read is encoded once (``Frames``): every entry's SSE frame (``id:``/``event:``/``data:``
lines, and the ``event: gap`` before an entry the length cap cut off from its predecessor) is
built when the hub reads it, and every follower at the same place gets the same bytes object.
The hub hands a share straight to the follower's socket when nothing stands in the way (the
follower's ``direct``: nothing queued for it, room in the socket's buffer); otherwise it is
queued, and the follower's task wakes once for whatever queued and sends it in one write. The
cost of a line per follower is then a socket write, not an encoding or a task's wake-up.

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
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from aqsh.clock import finish
from aqsh.engine.faults import Backoff, LoopMonitor

log = structlog.get_logger("aqsh.api")

Entry = tuple[str, dict[bytes, Any]]
BLOCK_MS = 10_000
BATCH = 1000
QUEUE_LIMIT = 100  # shares (one per read) waiting for one follower
#: What one follower may have waiting (encoded SSE bytes).
FOLLOWER_MAX_BYTES = 8 * 1024 * 1024
#: The supervised loop's name in logs.
LOOP_NAME = "sse_hub"
_FIRST_RETRY_S = 0.1
_LONGEST_RETRY_S = 2.0
#: What aiohttp_sse's ``EventSourceResponse.send`` ends each field and event with, and how
#: it splits data into ``data:`` lines: the bytes here are the bytes it would send.
SEP = b"\r\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def stream_id(text: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence), not as text."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_event(data: str, *, id: str | None = None, event: str | None = None,
                 retry: int | None = None) -> bytes:
    """One SSE event, byte for byte what ``EventSourceResponse.send`` writes (ids and event
    names here never hold line breaks: stream ids and fixed names)."""
    head = (b"id: " + id.encode() + SEP if id is not None else b"") + (
        b"event: " + event.encode() + SEP if event is not None else b"")
    body = b"".join(b"data: " + chunk.encode() + SEP for chunk in _LINE_BREAK.split(data))
    tail = b"retry: %d" % retry + SEP if retry is not None else b""
    return head + body + tail + SEP


def lost_between(before: tuple[int, int], after: tuple[int, int]) -> int:
    """Entries the cap trimmed between two consecutive entries a reader got (0 for ids that
    do not count entries, such as those of logs written before ids did)."""
    return max(0, after[1] - before[1] - 1)


def gap_event(lost: int) -> bytes:
    return encode_event(f'{{"lost":{lost}}}', event="gap")


#: ``Share.ending`` when the share holds no line, eof or start: the follower's state stays.
KEEP: Any = object()


class Share:
    """What one follower gets of one read: its SSE bytes, the id it is at afterwards, and
    ``ending``: the eof marker ``(id, exit code)`` that ends the stream unless more follows,
    ``None`` when a line or a new attempt came after it, or ``KEEP``."""

    __slots__ = ("_chunk", "data", "ending", "ids", "last")

    def __init__(self, data: bytes, last: tuple[int, int], ending: Any,
                 ids: Sequence[str]) -> None:
        self.data = data
        self._chunk: bytes | None = None
        self.last = last
        self.ending = ending
        #: The entry ids it covers (tests, logs).
        self.ids = ids

    def chunk(self) -> bytes:
        """``data`` as one HTTP/1.1 chunk (what aiohttp's chunked writer would send), made
        once for every follower this share goes to."""
        if self._chunk is None:
            self._chunk = b"%x\r\n" % len(self.data) + self.data + b"\r\n"
        return self._chunk


class Frames:
    """One read's entries, each encoded once as SSE for every follower.

    ``_parts[i]`` is entry ``i``'s frame preceded by the gap event that separates it from entry
    ``i - 1`` (``_gaps[i]``); ``_heads[i]`` is the frame alone, for a share that starts at
    ``i`` (its gap depends on its follower's own position). Entries without a line (eof and
    start markers) have no frame of their own; they change the follower's ``ending``. Stderr
    lines have a second form with ``event: stderr`` (``?stderr=event``).
    """

    __slots__ = (
        "_cache",
        "_end",
        "_end_at",
        "_gaps",
        "_heads",
        "_marked",
        "_parts",
        "entry_ids",
        "ids",
    )

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entry_ids = [entry_id for entry_id, _ in entries]
        self.ids = [stream_id(entry_id) for entry_id in self.entry_ids]
        self._gaps: list[bytes] = []
        self._heads: list[bytes] = []
        self._parts: list[bytes] = []
        #: entry index -> the stderr-marked frame, for stderr lines only.
        self._marked: dict[int, bytes] = {}
        #: The last entry that decides ``ending``, and what it decides.
        self._end_at = -1
        self._end: Any = KEEP
        self._cache: dict[tuple[int, int, bool], Share] = {}
        previous: tuple[int, int] | None = None
        for index, ((entry_id, fields), at) in enumerate(zip(entries, self.ids, strict=True)):
            line = fields.get(b"line")
            frame = b""
            if line is not None:
                text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
                body = b"".join(b"data: " + chunk.encode() + SEP
                                for chunk in _LINE_BREAK.split(text)) + SEP
                head = b"id: " + entry_id.encode() + SEP
                frame = head + body
                if fields.get(b"stream") == b"stderr":
                    self._marked[index] = head + b"event: stderr" + SEP + body
                self._end_at, self._end = index, None
            elif b"eof" in fields:
                self._end_at = index
                self._end = (entry_id, _text(fields.get(b"exit_code", b"")))
            elif b"start" in fields:
                self._end_at, self._end = index, None
            lost = lost_between(previous, at) if previous is not None else 0
            gap = gap_event(lost) if lost else b""
            self._gaps.append(gap)
            self._heads.append(frame)
            self._parts.append(gap + frame)
            previous = at

    def share(self, last: tuple[int, int], marked: bool = False) -> Share | None:
        """What a follower at ``last`` gets: the entries after it (never one twice, never
        backwards), or None when it has them all. Followers at the same place get the same
        share (encoded on the first one's demand)."""
        start = bisect.bisect_right(self.ids, last)
        if start == len(self.ids):
            return None
        lost = lost_between(last, self.ids[start])
        marked = marked and bool(self._marked)
        key = (start, lost, marked)
        share = self._cache.get(key)
        if share is None:
            if marked:
                rest = b"".join(self._gaps[i] + self._marked.get(i, self._heads[i])
                                for i in range(start + 1, len(self.ids)))
                first = self._marked.get(start, self._heads[start])
            else:
                rest = b"".join(self._parts[start + 1:])
                first = self._heads[start]
            data = (gap_event(lost) if lost else b"") + first + rest
            share = self._cache[key] = Share(
                data, self.ids[-1], self._end if self._end_at >= start else KEEP,
                self.entry_ids[start:])
        return share


class Follower:
    """One SSE client's place in one stream; ``take`` gives what the hub delivered to it.

    A mailbox, not an ``asyncio.Queue`` under ``wait_for``: the hub appends shares and resolves
    the one future the follower waits on, and ``take`` returns everything waiting at once."""

    def __init__(self, key: str, last: str, queue_limit: int,
                 max_bytes: int = FOLLOWER_MAX_BYTES, *, marked: bool = False,
                 direct: Callable[[Share], bool] | None = None) -> None:
        self.key = key
        #: The client's fast path: writes a share at once and says True, or says False when
        #: it cannot (then the share is queued for the follower's own task).
        self.direct = direct
        self.last = stream_id(last)
        #: Wants stderr lines as ``event: stderr``.
        self.marked = marked
        self.queue_limit = queue_limit
        self.max_bytes = max_bytes
        #: Shares waiting; None is a wake-up (the hub's read failed).
        self.waiting: deque[Share | None] = deque()
        #: Bytes of the shares in ``waiting``.
        self.queued_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Set when the hub dropped this follower for falling behind: catch up, then rejoin.
        self.dropped = False

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, share: Share) -> bool:
        """Queue a share unless that would pass either bound; False: too far behind."""
        if not self.waiting and self.direct is not None and self.direct(share):
            return True
        size = len(share.data)
        if len(self.waiting) >= self.queue_limit or (
                self.queued_bytes + size > self.max_bytes and self.waiting):
            return False
        self.waiting.append(share)
        self.queued_bytes += size
        self._notify()
        return True

    def wake(self) -> None:
        """A wake-up: the hub's read failed; the follower should look for itself."""
        if len(self.waiting) < self.queue_limit:
            self.waiting.append(None)
            self._notify()

    async def take(self, timeout_s: float) -> list[Share]:
        """Every share waiting (waiting first for one if none is), ``[]`` for a wake-up;
        TimeoutError after ``timeout_s`` of nothing."""
        if not self.waiting:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            expiry = loop.call_later(timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                self._waiter = None
            if not self.waiting:
                raise TimeoutError
        shares = [share for share in self.waiting if share is not None]
        self.waiting.clear()
        self.queued_bytes = 0
        return shares


def _abandoned(read: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned read's outcome (a failure there is no one's to handle)."""
    if not read.cancelled():
        read.exception()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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

    def join(self, key: str, last: str, *, marked: bool = False,
             direct: Callable[[Share], bool] | None = None) -> Follower:
        """``marked``: this follower wants stderr lines as ``event: stderr``; ``direct``: its
        fast path (``Follower.direct``)."""
        follower = Follower(key, last, self.queue_limit, self.follower_max_bytes,
                            marked=marked, direct=direct)
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
            # the new set at once. The old read is abandoned, not awaited: redis-py lets a
            # cancelled XREAD BLOCK finish its block (up to block_ms) before it drops the
            # connection, and waiting for it would stall every follower that long. Its reply,
            # if any, is dropped; the next read starts from the cursor.
            read.cancel()
            read.add_done_callback(_abandoned)
            return
        reply: Any = read.result()
        self.reads += 1
        for raw_key, raw_entries in reply or []:
            key = _text(raw_key)
            self._deliver(key, [(_text(i), f) for i, f in raw_entries],
                          read_from=stream_id(streams[key]))

    def _deliver(self, key: str, entries: Sequence[Entry], *, read_from: tuple[int, int]) -> None:
        """Hand out what one read of ``key`` (after ``read_from``) returned, encoded once.

        A follower that joined behind ``read_from`` while the read was under way needs older
        entries first: it gets nothing now, and the cursor stays where its join put it, so the
        next read starts there (the others skip what they already have).
        """
        if not entries or key not in self._followers:
            return
        frames = Frames(entries)
        newest = frames.ids[-1]
        if self._cursor.get(key) == read_from:
            self._cursor[key] = newest
        for follower in list(self._followers[key]):
            if follower.last < read_from:
                continue
            share = frames.share(follower.last, follower.marked)
            if share is None:
                continue
            if not follower.offer(share):
                follower.dropped = True
                self.leave(follower)
                continue
            follower.last = newest
