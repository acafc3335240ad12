"""Inspector: the read and control side of asynq's layout (what the Go Inspector does).

Every read is one round trip per call where asynq's needs one per task: lists fetch their task
hashes in one pipeline, queue info is one script. ``find_task`` answers "where is task <id>?"
for the HTTP API, which only has the id: one pipeline of ``HMGET asynq:{q}:t:<id>`` over every
known queue (a single round trip on a standalone server; a Cluster client splits it per node,
so still at most one round trip per queue).

``find_task`` is ``GET /tasks/{id}``'s lookup, so it is kept to one round trip: one
``inspect_get_task`` script call per queue, pipelined (over the broker's fast lane when the
Inspector has one, redis-py otherwise, a Cluster included), with the caller's own read-only
script calls riding along (``find_task_with``); and the list of queues to search is
remembered for ``QUEUE_LIST_TTL_S`` instead of read per lookup. A remembered list can only
lack a queue created since: a lookup that finds nothing reads the list afresh and searches the
queues it did not know, so a stale list costs a miss a round trip, never a wrong 404.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from aqsh import errors
from aqsh.clock import Clock, SystemClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.broker import ARCHIVED_EXPIRATION_S, MAX_ARCHIVE_SIZE
from aqsh.engine.connection import RedisClient
from aqsh.engine.models import (
    SchedulerEnqueueEvent,
    SchedulerEntry,
    ServerInfo,
    TaskInfo,
    TaskMessage,
    TaskState,
    WorkerInfo,
)
from aqsh.engine.rdb import broker_error, guarded
from aqsh.engine.scripts import Batch, ScriptLane, Scripts

DEFAULT_PAGE_SIZE = 30
#: How long ``find_task`` searches a list of queues it read before reading it again.
QUEUE_LIST_TTL_S = 2.0
_GET_TASK = "inspect_get_task"
_MEMORY_SAMPLE = 20
_MEMORY_GROUP_SAMPLE = 5


class QueueInfo(msgspec.Struct, kw_only=True):
    """asynq's QueueInfo (Size includes completed and aggregating, as asynq's code does)."""

    queue: str
    size: int
    pending: int
    active: int
    scheduled: int
    retry: int
    archived: int
    completed: int
    aggregating: int
    groups: int
    processed: int
    failed: int
    processed_total: int
    failed_total: int
    paused: bool
    latency_s: float
    memory_usage_bytes: int
    timestamp_s: int


class DailyStats(msgspec.Struct, kw_only=True):
    queue: str
    date: str
    processed: int
    failed: int


class ServerStatus(msgspec.Struct, kw_only=True):
    info: ServerInfo
    workers: list[WorkerInfo]


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Inspector:
    def __init__(self, client: RedisClient, *, clock: Clock | None = None,
                 known_queues: Callable[[], Iterable[str]] | None = None,
                 lane: ScriptLane | None = None) -> None:
        """``known_queues``: queues to search by id beside those Redis lists in
        ``asynq:queues`` — that set is lost when Redis restarts empty, while the tasks enqueued
        since then are not. ``lane``: a fast lane (aqsh.engine.fastlane) for ``find_task``'s
        script calls (the broker's; the owner closes it)."""
        self.redis = client
        self.clock = clock or SystemClock()
        self.scripts = Scripts(client)
        self._lookups = Scripts(client, lane) if lane is not None else self.scripts
        self.known_queues = known_queues
        self._searched: tuple[list[str], float] | None = None  # (queues, read at: monotonic)
        self._reading: asyncio.Future[list[str]] | None = None  # the list's read under way

    # ------------------------------------------------------------------ queues
    async def queues(self) -> list[str]:
        members = await guarded(self.redis.smembers(keys.ALL_QUEUES))
        return sorted(_text(m) for m in members)

    async def _require_queue(self, qname: str) -> None:
        if not qname.strip():
            raise errors.InvalidArgument("queue name must not be blank")
        if not await guarded(self.redis.sismember(keys.ALL_QUEUES, qname)):
            raise errors.QueueNotFound(f'queue "{qname}" does not exist')

    async def queue_info(self, qname: str) -> QueueInfo:
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        now_ns = self.clock.now_ns()
        now = now_ns // 1_000_000_000
        raw = await guarded(
            self.scripts.run(
                "inspect_queue_stats",
                [
                    q.pending, q.active, q.scheduled, q.retry, q.archived, q.completed,
                    q.processed_day(now), q.failed_day(now), q.processed_total, q.failed_total,
                    q.paused, q.groups,
                ],
                [q.task_prefix, q.group_prefix, _MEMORY_SAMPLE, _MEMORY_GROUP_SAMPLE],
            )
        )
        (pending, active, scheduled, retry, archived, completed, processed, failed,
         processed_total, failed_total, paused, oldest_ns, groups, aggregating, memory) = (
            _int(v) for v in raw
        )
        latency_s = (now_ns - oldest_ns) / 1e9 if oldest_ns > 0 else 0.0
        return QueueInfo(
            queue=qname,
            size=pending + active + scheduled + retry + archived + completed + aggregating,
            pending=pending, active=active, scheduled=scheduled, retry=retry,
            archived=archived, completed=completed, aggregating=aggregating, groups=groups,
            processed=processed, failed=failed, processed_total=processed_total,
            failed_total=failed_total, paused=bool(paused), latency_s=max(latency_s, 0.0),
            memory_usage_bytes=memory, timestamp_s=now,
        )

    async def history(self, qname: str, days: int) -> list[DailyStats]:
        """Today first, going back one UTC day at a time."""
        if days < 1:
            raise errors.InvalidArgument("days must be at least 1")
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        now = unix_s(self.clock)
        stamps = [now - i * 86400 for i in range(days)]
        pipe = self.redis.pipeline(transaction=False)
        for ts in stamps:
            pipe.get(q.processed_day(ts))
            pipe.get(q.failed_day(ts))
        values = await guarded(pipe.execute())
        return [
            DailyStats(queue=qname, date=keys.day_suffix(ts), processed=_int(values[2 * i]),
                       failed=_int(values[2 * i + 1]))
            for i, ts in enumerate(stamps)
        ]

    async def groups(self, qname: str) -> dict[str, int]:
        q = keys.queue_keys(qname)
        names = sorted(_text(g) for g in await guarded(self.redis.smembers(q.groups)))
        pipe = self.redis.pipeline(transaction=False)
        for g in names:
            pipe.zcard(q.group(g))
        sizes = await guarded(pipe.execute())
        return dict(zip(names, (int(s) for s in sizes), strict=True))

    # ------------------------------------------------------------------ tasks
    async def list_tasks(
        self,
        qname: str,
        state: TaskState,
        *,
        page: int = 1,
        page_size: int = DEFAULT_PAGE_SIZE,
        group: str | None = None,
    ) -> list[TaskInfo]:
        """asynq's pagination: pending/active oldest first (next to run first), zsets by score."""
        if page < 1 or page_size < 1:
            raise errors.InvalidArgument("page and page_size start at 1")
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        start = (page - 1) * page_size
        now = unix_s(self.clock)
        scores: dict[str, int] = {}
        if state in (TaskState.PENDING, TaskState.ACTIVE):
            container = q.pending if state is TaskState.PENDING else q.active
            raw_ids = await guarded(
                self.redis.lrange(container, -(start + page_size), -start - 1)
            )
            ids = [_text(i) for i in reversed(raw_ids)]
        else:
            if state is TaskState.AGGREGATING:
                if not group:
                    raise errors.InvalidArgument("listing aggregating tasks needs a group")
                container = q.group(group)
            else:
                container = q.state_container(state)
            pairs: list[Any] = await guarded(
                self.redis.zrange(container, start, start + page_size - 1, withscores=True)
            )
            ids = [_text(member) for member, _ in pairs]
            scores = {_text(member): int(score) for member, score in pairs}
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(q.task(task_id), "msg", "result", "pending_since")
        if state is TaskState.ACTIVE:
            for task_id in ids:
                pipe.zscore(q.lease, task_id)
        replies = await guarded(pipe.execute())
        out: list[TaskInfo] = []
        for i, task_id in enumerate(ids):
            raw_msg, result, since = replies[i]
            message = _decode_or_none(raw_msg)
            if message is None:
                continue
            info = TaskInfo(
                message=message,
                state=state,
                result=result,
                pending_since_ns=_int(since),
                next_process_at_s=_next_process_at(state, scores.get(task_id, 0), now),
            )
            if state is TaskState.ACTIVE:
                lease = replies[len(ids) + i]
                info.is_orphaned = lease is None or int(lease) <= now
            out.append(info)
        return out

    async def task_info(self, qname: str, task_id: str) -> TaskInfo:
        await self._require_queue(qname)
        try:
            return await self.find_task(task_id, [qname])
        except errors.TaskNotFound:
            raise errors.TaskNotFound(f"task {task_id} not found in queue {qname!r}") from None

    async def find_task(self, task_id: str, queues: Sequence[str] | None = None) -> TaskInfo:
        """Locate a task by id alone across every queue (or ``queues``), in one round trip."""
        return (await self.find_task_with(task_id, Batch(), (), queues))[0]

    async def find_task_with(self, task_id: str, extra: Batch, names: Sequence[str],
                             queues: Sequence[str] | None = None,
                             ) -> tuple[TaskInfo, list[Any]]:
        """``find_task``, with ``extra`` — read-only calls of the scripts ``names`` — sent in the
        same round trip; their replies (error replies as exception objects) come back beside
        the task, in order."""
        searched = list(queues) if queues is not None else await self._queue_list(fresh=False)
        batch = Batch()
        for qname in searched:
            self._lookup(batch, qname, task_id)
        batch.commands += extra.commands
        replies = await self._run(batch, names)
        found = next((info for info in self._infos(replies[: len(searched)]) if info), None)
        if found is None and queues is None:
            # The remembered list may predate the task's queue: search the queues it lacked.
            known = set(searched)
            unknown = [q for q in await self._queue_list(fresh=True) if q not in known]
            if unknown:
                found = (await self.find_task_with(task_id, Batch(), (), unknown))[0]
        if found is None:
            raise errors.TaskNotFound(f"task {task_id} not found")
        return found, replies[len(searched):]

    async def _queue_list(self, *, fresh: bool) -> list[str]:
        """The queues a lookup by id searches: ``asynq:queues`` and ``known_queues``, as read
        at most ``QUEUE_LIST_TTL_S`` ago unless ``fresh``. Lookups that find the list expired
        together wait for one read (fifty at once would otherwise each take a connection of
        redis-py's pool); a ``fresh`` read is always its own, begun after its caller's miss."""
        searched = self._searched
        if not fresh and searched is not None and time.monotonic() - searched[1] < QUEUE_LIST_TTL_S:
            return searched[0]
        if fresh:
            return await self._read_queue_list()
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read_queue_list())
            self._reading.add_done_callback(self._read_done)
        # Shielded: a caller that gives up must not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    def _read_done(self, reading: asyncio.Future[list[str]]) -> None:
        self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: a failure is the waiters' to raise, not the loop's

    async def _read_queue_list(self) -> list[str]:
        read_at = time.monotonic()
        names = await self.queues()
        if self.known_queues is not None:
            names = sorted({*names, *self.known_queues()})
        self._searched = (names, read_at)
        return names

    async def find_many(self, tasks: Sequence[tuple[str, str]]) -> list[TaskInfo | None]:
        """(queue, task id) pairs → each task (None when absent), in one round trip: for
        callers that look up many tasks whose queues they know."""
        batch = Batch()
        for qname, task_id in tasks:
            self._lookup(batch, qname, task_id)
        return self._infos(await self._run(batch, ()))

    @staticmethod
    def _lookup(batch: Batch, qname: str, task_id: str) -> None:
        q = keys.queue_keys(qname)
        batch.script(_GET_TASK, [q.task(task_id), q.scheduled, q.retry, q.lease], [task_id])

    async def _run(self, batch: Batch, names: Sequence[str]) -> list[Any]:
        if not batch:
            return []
        return await guarded(self._lookups.execute(batch, [_GET_TASK, *names]))

    def _infos(self, replies: Sequence[Any]) -> list[TaskInfo | None]:
        """``inspect_get_task`` replies → each task, None where the queue holds none."""
        now = unix_s(self.clock)
        out: list[TaskInfo | None] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise broker_error(reply) or reply
            message = _decode_or_none(reply[0]) if reply is not None else None
            if message is None:
                out.append(None)
                continue
            _, raw_state, result, since, raw_score = reply
            state = TaskState(_text(raw_state))
            score = float(raw_score) if raw_score is not None else None
            out.append(TaskInfo(
                message=message,
                state=state,
                result=result,
                pending_since_ns=_int(since),
                next_process_at_s=_next_process_at(state, int(score or 0), now),
                is_orphaned=state is TaskState.ACTIVE and (score is None or score <= now),
            ))
        return out

    # ------------------------------------------------------------------ mutations
    async def _task_op(self, qname: str, task_id: str, op: str) -> None:
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        now = unix_s(self.clock)
        code = int(
            await guarded(
                self.scripts.run(
                    "inspect_task_op",
                    [q.task(task_id), q.pending, q.archived, q.groups],
                    [task_id, op, q.base, q.group_prefix, now, now - ARCHIVED_EXPIRATION_S,
                     MAX_ARCHIVE_SIZE, q.task_prefix],
                )
            )
        )
        if code == 0:
            raise errors.TaskNotFound(f"task {task_id} not found in queue {qname!r}")
        if code == -1:
            raise errors.TaskStateConflict(
                f"cannot {op} task {task_id}: it is active; cancel it instead"
            )
        if code == -2:
            already = "pending" if op == "run" else "archived"
            raise errors.TaskStateConflict(f"task {task_id} is already {already}")

    async def run_task(self, qname: str, task_id: str) -> None:
        await self._task_op(qname, task_id, "run")

    async def archive_task(self, qname: str, task_id: str) -> None:
        await self._task_op(qname, task_id, "archive")

    async def delete_task(self, qname: str, task_id: str) -> None:
        await self._task_op(qname, task_id, "delete")

    async def _bulk(self, qname: str, state: TaskState, op: str, group: str | None) -> int:
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        if state is TaskState.ACTIVE:
            raise errors.TaskStateConflict(f"cannot {op} active tasks; cancel them instead")
        if state is TaskState.AGGREGATING:
            if not group:
                raise errors.InvalidArgument("aggregating tasks need a group")
            source, is_list = q.group(group), False
        elif state is TaskState.PENDING:
            source, is_list = q.pending, True
        else:
            source, is_list = q.state_container(state), False
        now = unix_s(self.clock)
        return int(
            await guarded(
                self.scripts.run(
                    "inspect_bulk_op",
                    [source, q.pending, q.archived, q.groups],
                    [op, 1 if is_list else 0, q.task_prefix, now, now - ARCHIVED_EXPIRATION_S,
                     MAX_ARCHIVE_SIZE, group or ""],
                )
            )
        )

    async def run_all(self, qname: str, state: TaskState, *, group: str | None = None) -> int:
        if state is TaskState.PENDING:
            return 0
        return await self._bulk(qname, state, "run", group)

    async def archive_all(self, qname: str, state: TaskState, *, group: str | None = None) -> int:
        if state is TaskState.ARCHIVED:
            return 0
        return await self._bulk(qname, state, "archive", group)

    async def delete_all(self, qname: str, state: TaskState, *, group: str | None = None) -> int:
        return await self._bulk(qname, state, "delete", group)

    async def pause_queue(self, qname: str) -> None:
        await self._require_queue(qname)
        if not await guarded(self.redis.setnx(keys.queue_keys(qname).paused, unix_s(self.clock))):
            raise errors.QueueAlreadyPaused(f'queue "{qname}" is already paused')

    async def unpause_queue(self, qname: str) -> None:
        await self._require_queue(qname)
        if int(await guarded(self.redis.delete(keys.queue_keys(qname).paused))) == 0:
            raise errors.QueueNotPaused(f'queue "{qname}" is not paused')

    async def delete_queue(self, qname: str, *, force: bool = False) -> None:
        await self._require_queue(qname)
        q = keys.queue_keys(qname)
        code = int(
            await guarded(
                self.scripts.run(
                    "inspect_delete_queue",
                    [q.pending, q.active, q.scheduled, q.retry, q.archived, q.lease],
                    [1 if force else 0, q.task_prefix],
                )
            )
        )
        if code == -1:
            raise errors.Conflict(f'queue "{qname}" is not empty')
        if code == -2:
            raise errors.Conflict(f'cannot remove queue "{qname}" with active tasks')
        await guarded(self.redis.srem(keys.ALL_QUEUES, qname))

    async def cancel_processing(self, task_id: str) -> None:
        await guarded(self.redis.publish(keys.CANCEL_CHANNEL, task_id))

    # ------------------------------------------------------------------ servers
    async def servers(self) -> list[ServerStatus]:
        now = unix_s(self.clock)
        server_keys = await guarded(
            self.scripts.run("inspect_live_members", [keys.ALL_SERVERS], [now])
        )
        worker_keys = await guarded(
            self.scripts.run("inspect_live_members", [keys.ALL_WORKERS], [now])
        )
        pipe = self.redis.pipeline(transaction=False)
        for key in server_keys:
            pipe.get(key)
        for key in worker_keys:
            pipe.hvals(key)
        replies = await guarded(pipe.execute())
        statuses: dict[str, ServerStatus] = {}
        for raw in replies[: len(server_keys)]:
            if raw:
                info = wire.decode_server(raw)
                statuses[info.server_id] = ServerStatus(info=info, workers=[])
        for values in replies[len(server_keys):]:
            for raw in values or []:
                worker = wire.decode_worker(raw)
                if worker.server_id in statuses:
                    statuses[worker.server_id].workers.append(worker)
        return sorted(statuses.values(), key=lambda s: (s.info.host, s.info.pid))

    # ------------------------------------------------------------------ scheduler
    async def scheduler_entries(self) -> list[SchedulerEntry]:
        """Every live scheduler's entries (asynq's SchedulerEntries): schedulers in the order
        of their expiry, each one's entries as it wrote them."""
        now = unix_s(self.clock)
        entry_keys: list[Any] = await guarded(
            self.redis.zrangebyscore(keys.ALL_SCHEDULERS, now, "+inf"))
        if not entry_keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in entry_keys:
            pipe.lrange(key, 0, -1)
        replies = await guarded(pipe.execute())
        return [wire.decode_scheduler_entry(raw) for values in replies for raw in values or []]

    async def scheduler_events(self, entry_id: str, *, page: int = 1,
                               page_size: int = DEFAULT_PAGE_SIZE,
                               ) -> list[SchedulerEnqueueEvent]:
        """One entry's enqueue history, newest first (asynq's ListSchedulerEnqueueEvents)."""
        if page < 1 or page_size < 1:
            raise errors.InvalidArgument("page and page_size start at 1")
        start = (page - 1) * page_size
        raw: list[Any] = await guarded(self.redis.zrevrange(
            keys.scheduler_history_key(entry_id), start, start + page_size - 1))
        return [wire.decode_enqueue_event(item) for item in raw]


def _decode_or_none(raw: bytes | None) -> TaskMessage | None:
    """A hash without a readable ``msg`` is skipped, as asynq's listings do, so one corrupt
    task cannot fail a whole page (protobuf's DecodeError stays behind wire, the one
    protobuf importer)."""
    if raw is None:
        return None
    try:
        return wire.decode_task(raw)
    except Exception:
        return None


def _next_process_at(state: TaskState, score: int, now_s: int) -> int:
    if state in (TaskState.SCHEDULED, TaskState.RETRY):
        return score
    if state is TaskState.PENDING:
        return now_s
    return 0
