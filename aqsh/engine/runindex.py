"""The run index: every task of a type, newest first, in pages whose cost does not grow with
the history.

aqsh's client adds each task it stores to ``keys.runs_index_key(queue, type)`` (a sorted set of
task ids scored by enqueue time in Unix ms) in the very script that stores it, so an entry
never exists before its task. The index outlives tasks: asynq deletes completed tasks when
their retention ends, Asynqmon deletes tasks by hand. So every reader treats an entry as a hint:
a task that is gone is skipped and its entry removed (the index heals), the enqueue scripts
trim gone tasks from the old end, and :class:`RunIndexer` sweeps the rest.

asynq's Go client writes no index. :class:`RunIndexer` finds such tasks in asynq's own
containers (the newest entries of the pending list and of the scheduled, retry, archived and
completed sets, and the whole active list), and adds them with ``ZADD NX`` — an entry aqsh's
client wrote keeps its score — under the time they were first seen pending, or failed, or
completed, whichever it can tell.

``RUNS_TYPES`` lists the indexes (queue and type) so that a listing over every type knows what
to merge; the indexer keeps it up to date.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from aqsh.clock import Clock, SystemClock
from aqsh.engine import keys, wire
from aqsh.engine.connection import RedisClient
from aqsh.engine.models import TaskInfo, TaskMessage, TaskState
from aqsh.engine.rdb import guarded
from aqsh.engine.scripts import Batch, Scripts

#: Index entries a page may examine before it returns what it found: the bound on a page's
#: cost when filters match rarely (the caller then follows ``next``).
DEFAULT_SCAN_BUDGET = 1000
#: Newest entries of each asynq container the indexer looks at per pass.
DISCOVERY_WINDOW = 200
#: Active tasks read per queue: more than any worker fleet's concurrency.
MAX_ACTIVE_PER_QUEUE = 10_000
#: Index entries checked for gone tasks per index and pass.
SWEEP_SLICE = 200


class Cursor(msgspec.Struct, frozen=True, array_like=True):
    """Where a listing stopped: the last examined entry (its score and task id)."""

    score_ms: int
    task_id: str


class Source(msgspec.Struct, frozen=True, order=True):
    """One run index: the runs of ``task_type`` in ``queue``."""

    queue: str
    task_type: str

    @property
    def key(self) -> str:
        return keys.runs_index_key(self.queue, self.task_type)


class Run(msgspec.Struct, kw_only=True):
    """A run found in an index: the task, its index score and where it was indexed."""

    info: TaskInfo
    enqueued_ms: int
    source: Source


class Page(msgspec.Struct, kw_only=True):
    runs: list[Run]
    #: Set when more entries may follow: pass it back to continue after the last examined one.
    next: Cursor | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Head:
    """A stream's next entry in the heap of a merged listing. ``heapq`` pops its least item,
    so "less" here means newer: a larger score, then larger id bytes, as ZREVRANGE orders
    equal scores."""

    __slots__ = ("id_bytes", "score", "stream", "task_id")

    def __init__(self, score: int, task_id: str, stream: _Stream) -> None:
        self.score = score
        self.task_id = task_id
        self.id_bytes = task_id.encode()
        self.stream = stream

    def __lt__(self, other: _Head) -> bool:
        if self.score != other.score:
            return self.score > other.score
        return self.id_bytes > other.id_bytes


class _Stream:
    """One index read newest first in chunks, resuming after the last entry fetched."""

    def __init__(self, source: Source, bound: str, after: str) -> None:
        self.source = source
        self.bound = bound
        self.after = after
        self.buffer: list[tuple[int, str]] = []
        self.position = 0
        self.exhausted = False

    def needs_fill(self) -> bool:
        return not self.exhausted and self.position >= len(self.buffer)

    def filled(self, reply: Sequence[Any], count: int, since_ms: int | None) -> None:
        pairs = [(int(float(reply[i + 1])), _text(reply[i])) for i in range(0, len(reply), 2)]
        if len(pairs) < count:
            self.exhausted = True
        if since_ms is not None:
            kept = [p for p in pairs if p[0] >= since_ms]
            if len(kept) < len(pairs):
                self.exhausted = True
            pairs = kept
        self.buffer, self.position = pairs, 0
        if pairs:
            self.bound, self.after = str(pairs[-1][0]), pairs[-1][1]

    def head(self) -> _Head | None:
        if self.position >= len(self.buffer):
            return None
        score, task_id = self.buffer[self.position]
        return _Head(score, task_id, self)


class RunIndex:
    def __init__(self, client: RedisClient, *, clock: Clock | None = None) -> None:
        self.redis = client
        self.scripts = Scripts(client)
        self.clock = clock or SystemClock()

    async def sources(self) -> set[Source]:
        """Every index the indexer has registered."""
        members = await guarded(self.redis.smembers(keys.RUNS_TYPES))
        out: set[Source] = set()
        for raw in members:
            try:
                queue, task_type = msgspec.json.decode(raw, type=tuple[str, str])
            except msgspec.DecodeError:
                continue
            out.add(Source(queue, task_type))
        return out

    async def register(self, sources: Iterable[Source]) -> None:
        members = [msgspec.json.encode((s.queue, s.task_type)) for s in sources]
        if members:
            await guarded(self.redis.sadd(keys.RUNS_TYPES, *members))

    async def page(
        self,
        sources: Iterable[Source],
        *,
        limit: int,
        accept: Callable[[Run], bool],
        cursor: Cursor | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        budget: int = DEFAULT_SCAN_BUDGET,
    ) -> Page:
        """Up to ``limit`` runs that ``accept`` passes, newest first over every source merged,
        starting after ``cursor``; at most ``budget`` entries are examined, so a rare filter
        returns a short page (even an empty one) with a ``next`` cursor rather than a slow one.
        Entries whose task is gone are removed as they are met."""
        bound, after = "+inf", ""
        if until_ms is not None:
            bound = str(until_ms)
        if cursor is not None and (until_ms is None or cursor.score_ms <= until_ms):
            bound, after = str(cursor.score_ms), cursor.task_id
        streams = [_Stream(s, bound, after) for s in sorted(set(sources))]
        heap: list[_Head] = []
        runs: list[Run] = []
        examined = 0
        last: tuple[int, str] | None = None
        unexamined = False  # candidates taken off the streams but not looked at
        while len(runs) < limit and examined < budget:
            want = min(limit - len(runs), budget - examined)
            chunk = max(want, 20)
            candidates: list[tuple[int, str, Source]] = []
            while len(candidates) < want:
                await self._fill([s for s in streams if s.needs_fill()], chunk, since_ms, heap)
                if not heap:
                    break
                top = heapq.heappop(heap)
                stream = top.stream
                candidates.append((top.score, top.task_id, stream.source))
                stream.position += 1
                if (nxt := stream.head()) is not None:
                    heapq.heappush(heap, nxt)
            if not candidates:
                break
            infos = await self.fetch([(source.queue, task_id)
                                      for _, task_id, source in candidates])
            gone: dict[Source, list[str]] = {}
            for n, ((score, task_id, source), info) in enumerate(
                    zip(candidates, infos, strict=True)):
                examined += 1
                last = (score, task_id)
                if info is None:
                    gone.setdefault(source, []).append(task_id)
                    continue
                run = Run(info=info, enqueued_ms=score, source=source)
                if accept(run):
                    runs.append(run)
                    if len(runs) >= limit:
                        unexamined = n + 1 < len(candidates)
                        break
            await self._forget(gone)
        more = unexamined or bool(heap) or any(not s.exhausted for s in streams)
        if last is None or not more:
            return Page(runs=runs, next=None)
        return Page(runs=runs, next=Cursor(last[0], last[1]))

    async def _fill(self, streams: list[_Stream], count: int, since_ms: int | None,
                    heap: list[_Head]) -> None:
        """Reads the next chunk of each stream whose buffer ran out, in one round trip."""
        if not streams:
            return
        batch = Batch()
        for s in streams:
            batch.script("runs_after", [s.source.key], [s.bound, s.after, count])
        replies = await guarded(self.scripts.execute(batch, ["runs_after"]))
        for s, reply in zip(streams, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            s.filled(reply, count, since_ms)
            if (head := s.head()) is not None:
                heapq.heappush(heap, head)

    async def _forget(self, gone: dict[Source, list[str]]) -> None:
        if not gone:
            return
        pipe = self.redis.pipeline(transaction=False)
        for source, ids in gone.items():
            pipe.zrem(source.key, *ids)
        await guarded(pipe.execute())

    async def fetch(self, where: Sequence[tuple[str, str]]) -> list[TaskInfo | None]:
        """The tasks (queue, id) in one round trip; None for a task that is gone. A hash with
        an unreadable message is also None but is not reported gone (see ``_decode``)."""
        if not where:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for qname, task_id in where:
            q = keys.queue_keys(qname)
            pipe.hmget(q.task(task_id), "msg", "state", "result", "pending_since")
            pipe.zscore(q.scheduled, task_id)
            pipe.zscore(q.retry, task_id)
        replies = await guarded(pipe.execute())
        out: list[TaskInfo | None] = []
        for i in range(len(where)):
            (raw_msg, raw_state, result, since), scheduled, retry = replies[3 * i: 3 * i + 3]
            message = _decode(raw_msg)
            if message is None or raw_state is None:
                out.append(None)
                continue
            try:
                state = TaskState(_text(raw_state))
            except ValueError:
                out.append(None)
                continue
            score = scheduled if state is TaskState.SCHEDULED else retry
            out.append(TaskInfo(
                message=message, state=state, result=result,
                pending_since_ns=int(since or 0),
                next_process_at_s=int(score or 0)
                if state in (TaskState.SCHEDULED, TaskState.RETRY) else 0,
            ))
        return out

    async def active(self, queues: Iterable[str]) -> list[Run]:
        """Every active task of ``queues`` (what is running now, on every worker), with its
        index score where it has one, newest first."""
        names = sorted(set(queues))
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for qname in names:
            pipe.lrange(keys.queue_keys(qname).active, 0, MAX_ACTIVE_PER_QUEUE - 1)
        lists = await guarded(pipe.execute())
        where = [(qname, _text(i)) for qname, ids in zip(names, lists, strict=True)
                 for i in ids]
        infos = await self.fetch(where)
        found = [info for info in infos if info is not None]
        if not found:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for info in found:
            pipe.zscore(keys.runs_index_key(info.queue, info.type), info.id)
        scores = await guarded(pipe.execute())
        runs = [Run(info=info, enqueued_ms=int(score) if score is not None
                    else info.pending_since_ns // 1_000_000,
                    source=Source(info.queue, info.type))
                for info, score in zip(found, scores, strict=True)]
        runs.sort(key=lambda r: (r.enqueued_ms, r.info.id.encode()), reverse=True)
        return runs


def _decode(raw: bytes | None) -> TaskMessage | None:
    if raw is None:
        return None
    try:
        return wire.decode_task(raw)
    except Exception:  # protobuf's DecodeError stays behind wire; a corrupt hash is skipped
        return None


class RunIndexer:
    """Keeps the run indexes complete and clean; one pass per call of :meth:`run_once`.

    * registers the ``known`` sources (tasks.yaml's types) in ``RUNS_TYPES``;
    * looks at every queue in ``asynq:queues`` and those of the known sources;
    * indexes tasks no aqsh client indexed (asynq's Go client): the newest
      ``DISCOVERY_WINDOW`` entries of each container of each queue and every active task, so a
      Go task is found while it waits, runs, or after it finished (a Go producer faster than
      the window per pass can outrun it: those tasks are missing from the history);
    * removes entries whose task is gone, ``SWEEP_SLICE`` per index and pass, walking each
      index from its old end to its new one and starting over.

    Ids already looked at are remembered (up to ``seen_limit``) so that a pass costs the new
    tasks, not the window.
    """

    def __init__(self, client: RedisClient, *, known: Callable[[], Iterable[Source]],
                 clock: Clock | None = None,
                 seen_limit: int = 100_000) -> None:
        self.redis = client
        self.index = RunIndex(client, clock=clock)
        self.clock = clock or SystemClock()
        self.known = known
        self.seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.seen_limit = seen_limit
        self.sweep_at: dict[Source, int] = {}

    async def run_once(self) -> int:
        """One pass; returns how many tasks it added to an index."""
        known = set(self.known())
        await self.index.register(known)
        added = 0
        listed = await guarded(self.redis.smembers(keys.ALL_QUEUES))
        queue_names = sorted({*(_text(m) for m in listed), *(s.queue for s in known)})
        for qname in queue_names:
            added += await self._discover(qname)
        for source in sorted(await self.index.sources()):
            await self._sweep(source)
        return added

    async def _discover(self, qname: str) -> int:
        q = keys.queue_keys(qname)
        window = DISCOVERY_WINDOW
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(q.pending, 0, window - 1)
        pipe.lrange(q.active, 0, MAX_ACTIVE_PER_QUEUE - 1)
        for container in (q.scheduled, q.retry, q.archived, q.completed):
            pipe.zrevrange(container, 0, window - 1)
        replies = await guarded(pipe.execute())
        fresh: list[str] = []
        for ids in replies:
            for raw in ids:
                task_id = _text(raw)
                if (qname, task_id) in self.seen:
                    self.seen.move_to_end((qname, task_id))
                    continue
                self._remember(qname, task_id)
                fresh.append(task_id)
        if not fresh:
            return 0
        infos = await self.index.fetch([(qname, task_id) for task_id in fresh])
        now_ms = self.clock.now_ns() // 1_000_000
        sources: set[Source] = set()
        pipe = self.redis.pipeline(transaction=False)
        for info in infos:
            if info is None:
                continue
            source = Source(qname, info.type)
            sources.add(source)
            pipe.zadd(source.key, {info.id: _first_seen_ms(info, now_ms)}, nx=True)
        if not sources:
            return 0
        added = sum(int(n) for n in await guarded(pipe.execute()))
        await self.index.register(sources)
        return added

    def _remember(self, qname: str, task_id: str) -> None:
        self.seen[(qname, task_id)] = None
        if len(self.seen) > self.seen_limit:
            self.seen.popitem(last=False)

    async def _sweep(self, source: Source) -> None:
        start = self.sweep_at.get(source, 0)
        ids = [_text(i) for i in await guarded(
            self.redis.zrange(source.key, start, start + SWEEP_SLICE - 1))]
        if not ids:
            self.sweep_at[source] = 0
            return
        q = keys.queue_keys(source.queue)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(q.task(task_id))
        present = await guarded(pipe.execute())
        gone = [task_id for task_id, n in zip(ids, present, strict=True) if not n]
        if gone:
            await guarded(self.redis.zrem(source.key, *gone))
        self.sweep_at[source] = 0 if len(ids) < SWEEP_SLICE else start + len(ids) - len(gone)


def _first_seen_ms(info: TaskInfo, now_ms: int) -> int:
    """The best enqueue time the task itself tells: when it became pending, else when it
    last failed or completed, else now (a task scheduled by a Go client says nothing)."""
    candidates = [info.pending_since_ns // 1_000_000,
                  info.message.last_failed_at_s * 1000, info.message.completed_at_s * 1000]
    known = [c for c in candidates if c > 0]
    return min(known) if known else now_ms
