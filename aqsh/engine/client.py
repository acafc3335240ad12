"""Client: enqueue tasks the way asynq's Go client does, onto the same Redis layout.

Defaults follow asynq (queue ``default``, 25 retries, 30 min timeout when neither a timeout nor a
deadline is given). Every option is checked before anything is written. After an enqueue the
client announces the queue on ``aqsh:wake`` in the same round trip, so idle aqsh workers start the
task at once instead of waiting for their next poll.

The wake-up is a courtesy, never a condition: a Redis user without the right to publish on
``aqsh:wake`` (a Go-compatible ACL, or a Redis 7 user, which gets no channels by default) still
enqueues. The script's PUBLISH is a pcall whose refusal leaves the task stored; the client then
logs ``wakeup.refused`` once and sends no more wake-ups, and workers find tasks by polling.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog
from redis.exceptions import NoScriptError, ResponseError

from aqsh import errors
from aqsh.clock import Clock, SystemClock
from aqsh.engine import keys, wire
from aqsh.engine.connection import RedisClient
from aqsh.engine.fastlane import FastLane
from aqsh.engine.models import TaskInfo, TaskMessage, TaskState
from aqsh.engine.rdb import REDIS_DOWN, RedisBroker, broker_error, guarded, raise_for_produce
from aqsh.engine.scripts import Batch, evalsha

log = structlog.get_logger("aqsh.engine")

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRY = 25
DEFAULT_TIMEOUT_S = 30 * 60
_BATCH_LIMIT = 1000
#: An enqueue script's reply for "enqueued, but Redis refused the wake-up PUBLISH".
_ENQUEUED_UNWOKEN = 2
#: How long an SADD of a queue to asynq:queues is trusted before the next enqueue repeats it.
QUEUE_REASSERT_S = 10.0

Duration = timedelta | float | int
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def _seconds(value: Duration, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise errors.InvalidArgument(f"{name} must not be negative, got {seconds}s")
    return seconds


def _optional_seconds(value: Duration | None, name: str) -> float | None:
    return None if value is None else _seconds(value, name)


class EnqueueRequest(msgspec.Struct, kw_only=True):
    """One task for ``Client.enqueue_many``; the fields mirror ``Client.enqueue``'s options
    (durations as ``timedelta`` or seconds)."""

    type: str
    payload: bytes
    queue: str = DEFAULT_QUEUE
    max_retry: int = DEFAULT_MAX_RETRY
    timeout: Duration | None = None
    deadline: datetime | None = None
    process_at: datetime | None = None
    process_in: Duration | None = None
    unique_ttl: Duration | None = None
    task_id: str | None = None
    retention: Duration | None = None
    headers: dict[str, str] | None = None
    group: str | None = None


class _Plan(msgspec.Struct):
    """A validated enqueue: the message and which script places it."""

    message: TaskMessage
    script: str
    keys: list[str]
    args: list[Any]
    state: TaskState
    process_at_s: int


class Client:
    def __init__(
        self,
        client: RedisClient | RedisBroker,
        *,
        clock: Clock | None = None,
        wake_workers: bool = True,
        fast_lane: bool = False,
        index_runs: bool = True,
    ) -> None:
        """``fast_lane=True`` sends enqueues over one multiplexed connection of the client's
        own (``aqsh.engine.fastlane``), several times cheaper per enqueue than redis-py, when
        ``client`` points at a plain TCP Redis (otherwise redis-py is used as before: TLS,
        Sentinel, Cluster). That connection must be closed: ``async with Client(...)`` or
        ``await client.aclose()``.

        ``index_runs`` adds each task to its type's run index (``keys.runs_index_key``) in
        the script that stores it, which is what run histories page through; asynq's Go
        client writes none, which is why an index reader must tolerate gaps."""
        self.broker = client if isinstance(client, RedisBroker) else RedisBroker(client)
        self.redis = self.broker.client
        self.clock = clock or SystemClock()
        self.wake_workers = wake_workers
        self.index_runs = index_runs
        # Set by the first refused wake-up: this Redis user may not publish on aqsh:wake.
        self._wake_refused = False
        self._lane = FastLane.from_redis(self.redis) if fast_lane else None
        # queue -> monotonic time until which its SADD to asynq:queues is taken as still
        # standing. Not for ever (as asynq's client caches it): a Redis that restarted empty
        # has lost the set, and Asynqmon and the asynq CLI list queues from it.
        self._registered_queues: dict[str, float] = {}

    def _needs_registration(self, qname: str) -> bool:
        until = self._registered_queues.get(qname)
        return until is None or time.monotonic() >= until

    def _registered(self, qname: str) -> None:
        self._registered_queues[qname] = time.monotonic() + QUEUE_REASSERT_S

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the fast lane, if any; the redis client stays the caller's to close."""
        if self._lane is not None:
            await self._lane.aclose()

    async def _run_script(self, name: str, key_list: list[str], args: list[Any]) -> Any:
        if self._lane is None:
            return await guarded(self.broker.scripts.run(name, key_list, args))
        command = evalsha(name, key_list, args)
        try:  # guarded() inlined: one coroutine less on the hot path
            reply = (await self._lane.execute_many([command]))[0]
            if isinstance(reply, NoScriptError):  # rare (a flushed Redis): load, send again
                reply = (await self._lane.execute_scripts([command], [name]))[0]
        except REDIS_DOWN as exc:
            raise errors.BrokerUnavailable(f"redis unavailable: {exc}") from exc
        _raise_reply(reply)
        return reply

    async def _run_batch(self, batch: Batch, script_names: Sequence[str]) -> list[Any]:
        if self._lane is None:
            return await guarded(self.broker.scripts.execute(batch, script_names))
        return await guarded(self._lane.execute_scripts(batch.commands, script_names))

    async def enqueue(
        self,
        type: str,
        payload: bytes,
        *,
        queue: str = DEFAULT_QUEUE,
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Duration | None = None,  # noqa: ASYNC109 - the task timeout, as asynq
        deadline: datetime | None = None,
        process_at: datetime | None = None,
        process_in: Duration | None = None,
        unique_ttl: Duration | None = None,
        task_id: str | None = None,
        retention: Duration | None = None,
        headers: dict[str, str] | None = None,
        group: str | None = None,
    ) -> TaskInfo:
        """``group``: the task joins that group (state ``aggregating``) and runs only as part
        of one task aggregated from the group by a server with a group aggregator (asynq's
        ``Group``). With a process time in the future it is scheduled instead and, as asynq
        does, goes to ``pending`` rather than to the group when it comes due."""
        request = EnqueueRequest(
            type=type,
            payload=payload,
            queue=queue,
            max_retry=max_retry,
            timeout=timeout,
            deadline=deadline,
            process_at=process_at,
            process_in=process_in,
            unique_ttl=unique_ttl,
            task_id=task_id,
            retention=retention,
            headers=headers,
            group=group,
        )
        plan = self._indexed(self._plan(request))
        qname = plan.message.queue
        # The script that stores a pending task also publishes the wake-up, so a woken worker
        # always finds the task (a separate PUBLISH would go out before a task whose script
        # had to be reloaded after NOSCRIPT).
        args = [*plan.args, *self._wake_args(plan)]
        if not self._needs_registration(qname):  # the common case: one command
            reply = await self._run_script(plan.script, plan.keys, args)
            raise_for_produce(self._produced(reply), plan.message)
            return _info(plan)
        # asynq SADDs the queue name before the script; caching it per process like asynq
        # v0.25+ saves a command per enqueue. It is added to the cache only on success, and
        # re-asserted every QUEUE_REASSERT_S.
        batch = Batch()
        batch.command("SADD", keys.ALL_QUEUES, qname)
        batch.script(plan.script, plan.keys, args)
        replies = await self._run_batch(batch, [plan.script])
        for reply in replies:
            _raise_reply(reply)
        self._registered(qname)
        raise_for_produce(self._produced(replies[-1]), plan.message)
        return _info(plan)

    def _wake_args(self, plan: _Plan) -> list[str]:
        """The optional trailing script arguments that publish the queue name on aqsh:wake."""
        if self.wake_workers and not self._wake_refused and plan.state is TaskState.PENDING:
            return [keys.WAKE_CHANNEL, plan.message.queue]
        return []

    def _produced(self, reply: Any) -> int:
        """An enqueue script's reply as ``raise_for_produce`` takes it; notes a refused
        wake-up (the task is stored all the same)."""
        code = int(reply)
        if code != _ENQUEUED_UNWOKEN:
            return code
        if not self._wake_refused:
            self._wake_refused = True
            log.warning(
                "wakeup.refused", channel=keys.WAKE_CHANNEL,
                hint=f"the Redis user may not PUBLISH on {keys.WAKE_CHANNEL} (ACL &"
                     f"{keys.WAKE_CHANNEL}); tasks are still enqueued, workers start them "
                     "at their next poll; no more wake-ups are sent until a restart",
            )
        return 1

    async def enqueue_many(
        self, requests: Sequence[EnqueueRequest]
    ) -> list[TaskInfo | errors.AqshError]:
        """Enqueue a batch in one round trip. Invalid requests raise before anything is sent;
        per-task conflicts (duplicate, id conflict) come back in the result list.

        Plain immediate tasks of one queue travel together in one ``enqueue_batch`` script
        call (up to 1,000 per call); unique and scheduled tasks use their own scripts in the same
        pipeline. Each task is treated exactly as a single enqueue would treat it.
        """
        plans = [self._indexed(self._plan(r)) for r in requests]
        if not plans:
            return []
        batch = Batch()
        new_queues = {p.message.queue for p in plans
                      if self._needs_registration(p.message.queue)}
        if new_queues:
            batch.command("SADD", keys.ALL_QUEUES, *sorted(new_queues))
        # where[i] = (reply index, position inside a batch reply or -1)
        where: list[tuple[int, int]] = [(0, -1)] * len(plans)
        # Plain tasks travel in one enqueue_batch call per queue, or per queue and type when
        # indexed (the call's run index is that of one type).
        batches: dict[tuple[str, str], list[int]] = {}
        # The last script call that may store a pending task of a queue publishes its wake-up
        # (see enqueue): queue name -> (command index, the wake arguments).
        last_pending: dict[str, tuple[int, list[str]]] = {}
        for i, plan in enumerate(plans):
            if plan.script == "enqueue":
                group = plan.message.type if self.index_runs else ""
                batches.setdefault((plan.message.queue, group), []).append(i)
                continue
            where[i] = (len(batch), -1)
            if wake := self._wake_args(plan):
                last_pending[plan.message.queue] = (len(batch), wake)
            batch.script(plan.script, plan.keys, plan.args)
        now_ns = self.clock.now_ns()
        for (qname, group), members in batches.items():
            for start in range(0, len(members), _BATCH_LIMIT):
                chunk = members[start:start + _BATCH_LIMIT]
                for position, i in enumerate(chunk):
                    where[i] = (len(batch), position)
                batch_keys, batch_args = self._packed_call(
                    qname, group, [plans[i] for i in chunk], now_ns)
                if wake := self._wake_args(plans[chunk[0]]):
                    last_pending[qname] = (len(batch), wake)
                batch.script("enqueue_batch", batch_keys, batch_args)
        for index, wake in last_pending.values():
            batch.commands[index] = (*batch.commands[index], *wake)
        names = sorted({p.script for p in plans} | ({"enqueue_batch"} if batches else set()))
        return self._results(plans, where, await self._send_registering(batch, names, new_queues))

    async def enqueue_batch_with(
        self, requests: Sequence[EnqueueRequest], script: str,
        extra_keys: Sequence[str], extra_args: Sequence[Any],
    ) -> list[TaskInfo | errors.AqshError]:
        """Enqueue plain immediate tasks of one queue and one type (no unique key, group or
        process time: ``enqueue_batch``'s tasks) in one call of ``script``, a script that
        enqueues them as enqueue_batch does (lua/_enqueue_packed.lua) and writes more in the
        same atomic call. Its KEYS are [pending, the type's run index, *extra_keys], its ARGV
        enqueue_batch's five (the wake-up as "" "" when none is sent), then "1" when the client
        indexes runs ("0" otherwise), then ``extra_args``. Per-task conflicts come back in the
        result list, as from ``enqueue_many``. Not for Redis Cluster unless the extra keys
        share the queue's slot."""
        plans = [self._indexed(self._plan(r)) for r in requests]
        if not plans:
            raise errors.InvalidArgument("enqueue_batch_with needs at least one task")
        first = plans[0].message
        if any(p.script != "enqueue" or p.message.queue != first.queue
               or p.message.type != first.type for p in plans):
            raise errors.InvalidArgument(
                "enqueue_batch_with takes plain immediate tasks of one queue and type")
        batch = Batch()
        new_queues = {first.queue} if self._needs_registration(first.queue) else set()
        if new_queues:
            batch.command("SADD", keys.ALL_QUEUES, first.queue)
        batch_keys, batch_args = self._packed_call(
            first.queue, first.type, plans, self.clock.now_ns())
        if not self.index_runs:
            batch_keys.append(keys.runs_index_key(first.queue, first.type))
        wake = self._wake_args(plans[0]) or ["", ""]
        batch.script(script, [*batch_keys, *extra_keys],
                     [*batch_args, *wake, "1" if self.index_runs else "0", *extra_args])
        slot = len(batch) - 1
        return self._results(plans, [(slot, i) for i in range(len(plans))],
                             await self._send_registering(batch, [script], new_queues))

    def _packed_call(self, qname: str, task_type: str, plans: Sequence[_Plan],
                     now_ns: int) -> tuple[list[str], list[Any]]:
        """enqueue_batch's KEYS and its first three ARGV for ``plans`` (one queue; one type
        when the client indexes runs)."""
        q = keys.queue_keys(qname)
        batch_keys = [q.pending]
        if self.index_runs:
            batch_keys.append(keys.runs_index_key(qname, task_type))
        packed = b"".join(_packed(p.message.id.encode(), p.args[0]) for p in plans)
        return batch_keys, [now_ns, q.task_prefix, packed]

    async def _send_registering(self, batch: Batch, names: Sequence[str],
                                new_queues: set[str]) -> list[Any]:
        """Run ``batch``, whose first command is the SADD of ``new_queues`` when there are
        any; they count as registered once it succeeded."""
        replies = await self._run_batch(batch, names)
        if new_queues:
            _raise_reply(replies[0])
            for qname in new_queues:
                self._registered(qname)
        return replies

    def _results(self, plans: Sequence[_Plan], where: Sequence[tuple[int, int]],
                 replies: list[Any]) -> list[TaskInfo | errors.AqshError]:
        """Each plan's outcome from ``replies``: ``where[i]`` is (reply index, position in a
        batch script's reply or -1)."""
        results: list[TaskInfo | errors.AqshError] = []
        for plan, (slot, position) in zip(plans, where, strict=True):
            reply = replies[slot]
            if position >= 0 and type(reply) is list and reply[position] == 1:
                results.append(_info(plan))  # the common case, without the checks below
                continue
            try:
                _raise_reply(reply)
                raise_for_produce(self._produced(reply[position] if position >= 0 else reply),
                                  plan.message)
                results.append(_info(plan))
            except errors.AqshError as exc:
                results.append(exc)
        return results

    def _indexed(self, plan: _Plan) -> _Plan:
        """With ``index_runs``, the run index as the script's optional last key (and, for the
        schedule scripts, the time in ms as their last argument): the script stores the task
        and its index entry together, so the two cannot drift apart."""
        if self.index_runs:
            msg = plan.message
            plan.keys.append(keys.runs_index_key(msg.queue, msg.type))
            if plan.state is TaskState.SCHEDULED:
                plan.args.append(self.clock.now_ns() // 1_000_000)
        return plan

    def _plan(self, r: EnqueueRequest) -> _Plan:
        if not isinstance(r.type, str) or not r.type.strip():
            raise errors.InvalidArgument("task type must be a non-blank string")
        if not isinstance(r.payload, (bytes, bytearray, memoryview)):
            raise errors.InvalidArgument(
                f"payload must be bytes, got {type(r.payload).__name__}"
            )
        if not isinstance(r.queue, str) or not r.queue.strip():
            raise errors.InvalidArgument("queue name must contain a non-whitespace character")
        if isinstance(r.max_retry, bool) or not isinstance(r.max_retry, int) or r.max_retry < 0:
            raise errors.InvalidArgument(f"max_retry must be a non-negative int, got {r.max_retry}")
        timeout = _optional_seconds(r.timeout, "timeout")
        process_in = _optional_seconds(r.process_in, "process_in")
        unique_ttl = _optional_seconds(r.unique_ttl, "unique_ttl")
        retention = _optional_seconds(r.retention, "retention")
        if r.process_at is not None and process_in is not None:
            raise errors.InvalidArgument("give process_at or process_in, not both")
        if r.task_id is not None and not r.task_id.strip():
            raise errors.InvalidArgument("task_id must not be blank")
        if r.group is not None and (not isinstance(r.group, str) or not r.group.strip()):
            raise errors.InvalidArgument("group must be a non-blank string")
        if unique_ttl is not None and unique_ttl < 1:
            raise errors.InvalidArgument("unique_ttl must be at least 1 second")
        for name, when in (("deadline", r.deadline), ("process_at", r.process_at)):
            if when is not None and when.tzinfo is None:
                raise errors.InvalidArgument(f"{name} must be timezone-aware")

        now_ns = self.clock.now_ns()
        now_s = now_ns // 1_000_000_000
        timeout_s = int(timeout) if timeout is not None else 0
        deadline_s = int(r.deadline.timestamp()) if r.deadline is not None else 0
        if timeout_s == 0 and deadline_s == 0:
            timeout_s = DEFAULT_TIMEOUT_S
        q = keys.queue_keys(r.queue)
        payload = bytes(r.payload)
        task_id = r.task_id or new_task_id()
        message = TaskMessage(
            type=r.type,
            payload=payload,
            id=task_id,
            queue=r.queue,
            retry=r.max_retry,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            unique_key=q.unique(r.type, payload) if unique_ttl is not None else "",
            retention_s=int(retention) if retention is not None else 0,
            headers=dict(r.headers or {}),
            group_key=r.group or "",
        )
        # asynq compares the process time with now at full precision (a time half a second
        # ahead is scheduled, scored by its whole second); so do we, in integer nanoseconds.
        if r.process_at is not None:
            process_at_ns = (r.process_at - _EPOCH) // _ONE_US * 1000
        elif process_in is not None:
            process_at_ns = now_ns + int(process_in * 1e9)
        else:
            process_at_ns = now_ns
        process_at_s = process_at_ns // 1_000_000_000
        encoded = wire.encode_task(message)
        task_key = q.task(task_id)
        if process_at_ns > now_ns:
            if unique_ttl is not None:
                ttl_s = (process_at_ns + int(unique_ttl * 1e9) - now_ns) // 1_000_000_000
                return _Plan(
                    message, "schedule_unique", [message.unique_key, task_key, q.scheduled],
                    [task_id, ttl_s, process_at_s, encoded], TaskState.SCHEDULED, process_at_s,
                )
            return _Plan(
                message, "schedule", [task_key, q.scheduled],
                [encoded, process_at_s, task_id], TaskState.SCHEDULED, process_at_s,
            )
        if r.group:
            group_args = [encoded, task_id, now_s, r.group]
            group_keys = [task_key, q.group(r.group), q.groups]
            if unique_ttl is not None:
                return _Plan(
                    message, "add_to_group_unique", [*group_keys, message.unique_key],
                    [*group_args, int(unique_ttl)], TaskState.AGGREGATING, 0,
                )
            return _Plan(message, "add_to_group", group_keys, group_args,
                         TaskState.AGGREGATING, 0)
        if unique_ttl is not None:
            return _Plan(
                message, "enqueue_unique", [message.unique_key, task_key, q.pending],
                [task_id, int(unique_ttl), encoded, now_ns], TaskState.PENDING, now_s,
            )
        return _Plan(
            message, "enqueue", [task_key, q.pending], [encoded, task_id, now_ns],
            TaskState.PENDING, now_s,
        )


def _packed(task_id: bytes, encoded: bytes) -> bytes:
    """One task in enqueue_batch's argument: length-prefixed id, then length-prefixed message."""
    return (len(task_id).to_bytes(4, "big") + task_id
            + len(encoded).to_bytes(4, "big") + encoded)


_random_pool = bytearray()


def _forget_random_pool() -> None:
    """A forked child must not hand out the ids its parent will also hand out."""
    global _random_pool
    _random_pool = bytearray()


os.register_at_fork(after_in_child=_forget_random_pool)


def new_task_id() -> str:
    """A random (version 4) UUID string, as asynq's default task id; built by hand because
    ``str(uuid.uuid4())`` costs about a tenth of a whole fast-lane enqueue. The random bytes
    come from the OS (as uuid4's) 4 KiB at a time rather than one syscall per id."""
    global _random_pool
    if len(_random_pool) < 16:
        _random_pool = bytearray(os.urandom(4096))
    raw = _random_pool[-16:]
    del _random_pool[-16:]
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _raise_reply(reply: object) -> None:
    if isinstance(reply, BaseException) and (mapped := broker_error(reply)) is not None:
        raise mapped from reply
    if isinstance(reply, ResponseError):
        raise errors.AqshError(f"redis error: {reply}") from reply


def _info(plan: _Plan) -> TaskInfo:
    return TaskInfo(
        message=plan.message,
        state=plan.state,
        next_process_at_s=plan.process_at_s,
    )
