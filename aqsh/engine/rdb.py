"""RedisBroker: asynq's transitions on Redis, one Lua script (or one command) per method.

Each method builds KEYS/ARGV from ``keys.py``, runs the script and maps the reply to a typed
value or an ``aqsh.errors`` exception. Connection failures surface as ``BrokerUnavailable`` so the
processor's syncer and the HTTP layer can tell "Redis is away" from a logic error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh import errors
from aqsh.engine import flow, keys, wire
from aqsh.engine.broker import (
    AGGREGATION_TIMEOUT_S,
    ARCHIVED_EXPIRATION_S,
    LEASE_DURATION_S,
    MAX_ARCHIVE_SIZE,
    MAX_INT64,
    STATS_TTL_S,
    Leased,
)
from aqsh.engine.connection import RedisClient, open_pubsub
from aqsh.engine.fastlane import FastLane
from aqsh.engine.faults import classify, is_redis_fault
from aqsh.engine.models import (
    SchedulerEnqueueEvent,
    SchedulerEntry,
    ServerInfo,
    TaskMessage,
    WorkerInfo,
)
from aqsh.engine.scripts import Batch, Scripts

T = TypeVar("T")

#: Most runs one dequeue call holds (moves to wait) before it returns: a long line of runs of
#: one busy key is put aside in calls of bounded length, never in one that blocks Redis.
DEQUEUE_HOLD_LIMIT = 100

#: Connection-level failures: Redis is away, the operation may be retried later. On a Cluster
#: that includes a cluster that is down or has a slot no node serves (both mean a node is away).
REDIS_DOWN = (
    RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, SlotNotCoveredError,
)
_RESUBSCRIBE_DELAY_S = 1.0


def _not_found(exc: ResponseError, msg: TaskMessage) -> errors.AqshError:
    text = str(exc)
    if "NOT FOUND" in text:
        return errors.TaskNotFound(f"task {msg.id} is not active in queue {msg.queue!r}")
    return errors.AqshError(f"redis script error for task {msg.id}: {text}")


def broker_error(exc: BaseException) -> errors.AqshError | None:
    """The aqsh error for a Redis failure, or None when ``exc`` is not one (a script's own
    error reply such as NOT FOUND, a usage error). Connection loss and error replies about
    Redis's condition that clear by themselves (OOM, READONLY, LOADING...) become
    BrokerUnavailable: callers retry them like an outage and the API answers 503. Error replies
    that need an operator (NOPERM, WRONGTYPE) become BrokerFault."""
    if isinstance(exc, REDIS_DOWN):
        # Some say nothing (a cluster node's pool at its limit): name them then.
        return errors.BrokerUnavailable(
            f"redis unavailable: {str(exc) or type(exc).__name__}")
    if isinstance(exc, RedisClusterException):
        # A Cluster client that reaches no seed node says so with this generic class, the
        # connection error as its cause; anything else of that class is a usage error.
        if isinstance(exc.__cause__, REDIS_DOWN):
            return errors.BrokerUnavailable(f"redis unavailable: {exc}")
        return None
    if isinstance(exc, ResponseError) and is_redis_fault(exc):
        fault = classify(exc)
        if fault.transient:
            return errors.BrokerUnavailable(f"redis unavailable: {fault.kind}: {exc}")
        return errors.BrokerFault(f"redis refused the command: {fault.kind}: {exc}")
    return None


async def guarded(call: Awaitable[T]) -> T:
    """Await a Redis call, turning Redis failures into BrokerUnavailable / BrokerFault."""
    try:
        return await call
    except (*REDIS_DOWN, RedisClusterException, ResponseError) as exc:
        mapped = broker_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


class RedisBroker:
    """The Broker protocol (aqsh.engine.broker) over one redis-py asyncio client."""

    def __init__(self, client: RedisClient, *, fast_lane: bool = False) -> None:
        """``fast_lane=True``: script calls go over one multiplexed connection of the broker's
        own (plain TCP standalone Redis only; otherwise redis-py as before), which then needs
        ``await broker.close_fast_lane()``. It never spins: a worker's CPU belongs to its
        tasks."""
        self.client = client
        self.lane = FastLane.from_redis(client, spin_us=0) if fast_lane else None
        self.scripts = Scripts(client, self.lane)

    async def close_fast_lane(self) -> None:
        if self.lane is not None:
            await self.lane.aclose()

    # ---------------------------------------------------------------- producer side
    async def _produce(
        self, name: str, keys_: list[str], args: list[Any], msg: TaskMessage
    ) -> None:
        reply = await guarded(self.scripts.run(name, keys_, args))
        raise_for_produce(int(reply), msg)

    async def enqueue(self, msg: TaskMessage, *, now_ns: int) -> None:
        q = keys.queue_keys(msg.queue)
        await self._produce(
            "enqueue", [q.task(msg.id), q.pending], [wire.encode_task(msg), msg.id, now_ns], msg
        )

    async def enqueue_unique(self, msg: TaskMessage, *, ttl_s: int, now_ns: int) -> None:
        q = keys.queue_keys(msg.queue)
        await self._produce(
            "enqueue_unique",
            [msg.unique_key, q.task(msg.id), q.pending],
            [msg.id, int(ttl_s), wire.encode_task(msg), now_ns],
            msg,
        )

    async def schedule(self, msg: TaskMessage, *, process_at_s: int) -> None:
        q = keys.queue_keys(msg.queue)
        await self._produce(
            "schedule",
            [q.task(msg.id), q.scheduled],
            [wire.encode_task(msg), int(process_at_s), msg.id],
            msg,
        )

    async def schedule_unique(self, msg: TaskMessage, *, process_at_s: int, ttl_s: int) -> None:
        q = keys.queue_keys(msg.queue)
        await self._produce(
            "schedule_unique",
            [msg.unique_key, q.task(msg.id), q.scheduled],
            [msg.id, int(ttl_s), int(process_at_s), wire.encode_task(msg)],
            msg,
        )

    # ---------------------------------------------------------------- consumer side
    async def dequeue(self, queues: Sequence[str], *, now_s: int) -> Leased | None:
        leased = await self.dequeue_many(queues, limit=1, now_s=now_s)
        return leased[0] if leased else None

    async def dequeue_many(
        self, queues: Sequence[str], *, limit: int, now_s: int
    ) -> list[Leased]:
        """Queues are tried in the given order; later queues only fill what earlier ones left.

        One script call per queue, stopping at the first queue that fills the batch: the same
        priority behaviour as asynq's one-task dequeue, with fewer round trips under load. The
        script applies a run's concurrency rule itself (taking its slot or holding it), so a
        limited run costs no round trip more than a plain one; runs with a rate rule are
        admitted after it (``_admit``).
        """
        expires_s = int(now_s) + LEASE_DURATION_S
        now_ns = int(now_s) * 1_000_000_000
        out: list[Leased] = []
        for qname in queues:
            q = keys.queue_keys(qname)
            while True:
                wanted = limit - len(out)
                raw = await guarded(
                    self.scripts.run(
                        "dequeue",
                        [q.pending, q.paused, q.active, q.lease, q.scheduled,
                         keys.flow_registry_key(qname), keys.flow_waited_key(qname)],
                        [expires_s, q.task_prefix, wanted, DEQUEUE_HOLD_LIMIT, int(now_s),
                         now_ns // 1_000_000, now_ns // 1000, now_ns, flow.HELD_SCORE_S,
                         keys.flow_slots_prefix(qname), keys.flow_wait_prefix(qname), qname,
                         keys.WAKE_CHANNEL],
                    )
                )
                held_here = int(raw[0]) if raw else 0
                leased = [Leased(wire.decode_task(m), expires_s) for m in raw[1:]]
                admitted = await self._admit(leased, int(now_s))
                out.extend(admitted)
                if len(out) >= limit:
                    break
                # Runs that now wait left pending: take more in their place, so a line of
                # waiters never starves the runs behind it (each round empties pending a bit).
                if held_here < DEQUEUE_HOLD_LIMIT and (len(admitted) == len(leased)
                                                       or len(leased) < wanted):
                    break
            if len(out) >= limit:
                break
        return out

    async def _admit(self, leased: list[Leased], now_s: int) -> list[Leased]:
        """The leased runs with a rate rule that may start now; the others were moved to wait
        (aqsh.engine.flow) by their rate window, or then by their concurrency key (the dequeue
        script left a run with both rules to this, as the rate window comes first). One round
        trip per step, and none for runs without a rate rule.

        If a step fails the runs it covered stay active under their lease (running them could
        break their limit); the recoverer takes them back when the lease lapses."""
        rated = [(i, rate) for i, m in enumerate(leased)
                 if flow.HEADER_RATE_KEY in m.message.headers
                 and (rate := flow.rate_of(m.message)) is not None]
        if not rated:
            return leased
        now_ns = now_s * 1_000_000_000
        held: set[int] = set()
        batch = Batch()
        for i, rate in rated:
            batch.script(*flow.rate_call(leased[i].message, rate, now_s=now_s, now_ns=now_ns))
        replies = await guarded(self.scripts.execute(batch, ["flow_rate"]))
        for (i, _), reply in zip(rated, replies, strict=True):
            _raise_reply(reply)
            if int(reply) != 0:
                held.add(i)
        limited = [(i, rule) for i, _ in rated
                   if i not in held and (rule := flow.concurrency_of(leased[i].message))
                   is not None]
        if limited:
            batch = Batch()
            for i, rule in limited:
                batch.script(*flow.acquire_call(leased[i].message, rule, now_s=now_s,
                                                now_ns=now_ns, reserve_s=LEASE_DURATION_S))
            replies = await guarded(self.scripts.execute(batch, ["flow_acquire"]))
            for (i, _), reply in zip(limited, replies, strict=True):
                _raise_reply(reply)
                if int(reply) == 0:
                    held.add(i)
        return [m for i, m in enumerate(leased) if i not in held]

    async def sweep_dependencies(
            self, qname: str, *, now_s: int,
            before_cancel: Callable[[TaskMessage], Awaitable[None]] | None = None,
    ) -> flow.AfterSwept:
        """Runs of the queue waiting for other tasks (aqsh.engine.flow.HEADER_AFTER): start
        those whose dependencies all completed; cancel (archive, naming the dependency) those
        with one archived (failed or cancelled) or gone. How many moved, and the messages of
        those cancelled (for the server's transition hook: no worker ends them).
        ``before_cancel`` is awaited with each run's archived message before it is archived,
        so an observer can make its notice durable first (a crash between the archive and
        the hook's call would otherwise lose it).

        Dependencies may live in other queues (other Cluster slots): their states are read
        one command each, and only the waiter's own keys are written, in one script."""
        q = keys.queue_keys(qname)
        ids = await guarded(self.client.zrangebyscore(
            q.scheduled, flow.AFTER_SCORE_S, flow.AFTER_SCORE_S, start=0, num=1000))
        if not ids:
            return flow.AfterSwept()
        task_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(q.task(task_id), "msg")
        raws = await guarded(pipe.execute())
        waiting = [(wire.decode_task(raw), flow.after_of(wire.decode_task(raw)))
                   for raw in raws if raw is not None]
        deps = sorted({d for _, after in waiting for d in after})
        if not deps:
            return flow.AfterSwept()
        pipe = self.client.pipeline(transaction=False)
        for dq, did in deps:
            pipe.hget(keys.queue_keys(dq).task(did), "state")
        states = {d: (s.decode() if isinstance(s, bytes) else s)
                  for d, s in zip(deps, await guarded(pipe.execute()), strict=True)}
        moved = 0
        canceled: list[TaskMessage] = []
        for msg, after in waiting:
            if not after:
                continue
            problem = next((flow.dependency_problem(did, gone=states[(dq, did)] is None)
                            for dq, did in after
                            if states[(dq, did)] in (None, "archived")), None)
            if problem is None and not all(states[d] == "completed" for d in after):
                continue  # still waiting
            encoded, ended = b"", None
            if problem is not None:
                ended = msgspec.structs.replace(msg, error_msg=problem,
                                                last_failed_at_s=int(now_s))
                encoded = wire.encode_task(ended)
                if before_cancel is not None:
                    # It raising ends this pass before the cancel: the next sweep retries;
                    # the runs this pass already cancelled were told to it first.
                    await before_cancel(ended)
            since_ms = flow.after_since_ms(msg) if problem is None else None
            if int(await guarded(self.scripts.run(
                    "flow_after_end", [q.scheduled, q.pending, q.archived, q.task(msg.id),
                                       keys.flow_waited_key(qname)],
                    [msg.id, "run" if problem is None else "cancel", flow.AFTER_SCORE_S,
                     int(now_s), int(now_s) * 1_000_000_000, encoded, qname,
                     keys.WAKE_CHANNEL, msg.type, since_ms or "", int(now_s) * 1000]))):
                moved += 1
                if ended is not None:  # only this sweep's own move: never told twice
                    canceled.append(ended)
        return flow.AfterSwept(moved, tuple(canceled))

    async def repair_flow(self, qname: str, *, now_s: int) -> int:
        """The held-run sweep of one queue (lua/flow_repair.lua); how many waiters it
        promoted."""
        call = flow.repair_call(qname, now_s=int(now_s), now_ns=int(now_s) * 1_000_000_000,
                                reserve_s=LEASE_DURATION_S)
        return int(await guarded(self.scripts.run(*call)))

    def _done_call(self, msg: TaskMessage, now_s: int) -> tuple[str, list[str], list[Any]]:
        q = keys.queue_keys(msg.queue)
        key_list = [q.active, q.lease, q.task(msg.id), q.processed_day(now_s), q.processed_total]
        if msg.unique_key:
            key_list.append(msg.unique_key)
        return _releasing(("done", key_list, [msg.id, now_s + STATS_TTL_S, MAX_INT64]), msg,
                          now_s)

    def _complete_call(self, msg: TaskMessage, now_s: int,
                       result: bytes | None = None) -> tuple[str, list[str], list[Any]]:
        q = keys.queue_keys(msg.queue)
        completed = msgspec.structs.replace(msg, completed_at_s=now_s)
        key_list = [
            q.active, q.lease, q.completed, q.task(msg.id),
            q.processed_day(now_s), q.processed_total,
        ]
        if msg.unique_key:
            key_list.append(msg.unique_key)
        args = [
            msg.id, now_s + STATS_TTL_S, now_s + msg.retention_s,
            wire.encode_task(completed), MAX_INT64,
        ]
        if result is not None:
            args.append(result)
        return _releasing(("mark_complete", key_list, args), msg, now_s)

    def success_call(self, msg: TaskMessage, now_s: int,
                     result: bytes | None = None) -> tuple[str, list[str], list[Any]]:
        """The script that records a success: done, or mark_complete when retention is set
        (with the handler's ``result``, stored by the same call). A task without retention
        is deleted by ``done``, result and all, so its result is not sent."""
        if msg.retention_s > 0:
            return self._complete_call(msg, now_s, result)
        return self._done_call(msg, now_s)

    async def _finish(self, call: tuple[str, list[str], list[Any]], msg: TaskMessage) -> None:
        name, key_list, args = call
        try:
            await guarded(self.scripts.run(name, key_list, args))
        except ResponseError as exc:
            raise _not_found(exc, msg) from exc

    async def done(self, msg: TaskMessage, *, now_s: int) -> None:
        await self._finish(self._done_call(msg, int(now_s)), msg)

    async def mark_as_complete(self, msg: TaskMessage, *, now_s: int) -> None:
        await self._finish(self._complete_call(msg, int(now_s)), msg)

    async def finish_successes(
        self,
        msgs: Sequence[TaskMessage],
        *,
        now_s: int,
        results: Sequence[bytes | None] | None = None,
    ) -> list[errors.AqshError | None]:
        """Acknowledge many successes in one round trip (pipelined done/mark_complete).

        ``results`` (one per message, or None) are stored by the success transition itself
        (a retained task's), so a result is never lost while its completion is recorded.
        Returns one entry per message: None on success, else the error for that task.
        """
        if not msgs:
            return []
        batch = Batch()
        names: set[str] = set()
        slots: list[int] = []  # index of each message's transition reply
        for i, msg in enumerate(msgs):
            result = results[i] if results is not None else None
            name, key_list, args = self.success_call(msg, int(now_s), result)
            names.add(name)
            slots.append(len(batch))
            batch.script(name, key_list, args)
        replies = await guarded(self.scripts.execute(batch, sorted(names)))
        outcome: list[errors.AqshError | None] = []
        for msg, slot in zip(msgs, slots, strict=True):
            reply = replies[slot]
            mapped = broker_error(reply) if isinstance(reply, BaseException) else None
            if mapped is not None:
                outcome.append(mapped)
            elif isinstance(reply, ResponseError):
                outcome.append(_not_found(reply, msg))
            else:
                outcome.append(None)
        return outcome

    async def requeue(self, msg: TaskMessage) -> None:
        q = keys.queue_keys(msg.queue)
        await self._finish(
            ("requeue", [q.active, q.lease, q.pending, q.task(msg.id)], [msg.id]), msg
        )

    async def retry(
        self,
        msg: TaskMessage,
        *,
        retry_at_s: int,
        error_msg: str,
        is_failure: bool,
        now_s: int,
    ) -> None:
        now_s = int(now_s)
        q = keys.queue_keys(msg.queue)
        updated = msgspec.structs.replace(
            msg,
            retried=msg.retried + 1 if is_failure else msg.retried,
            error_msg=error_msg,
            last_failed_at_s=now_s,
        )
        key_list = [
            q.task(msg.id), q.active, q.lease, q.retry, q.processed_day(now_s),
            q.failed_day(now_s), q.processed_total, q.failed_total,
        ]
        args = [
            msg.id, wire.encode_task(updated), int(retry_at_s), now_s + STATS_TTL_S,
            1 if is_failure else 0, MAX_INT64,
        ]
        await self._finish(_releasing(("retry", key_list, args), msg, now_s), msg)

    async def archive(self, msg: TaskMessage, *, error_msg: str, now_s: int) -> None:
        now_s = int(now_s)
        q = keys.queue_keys(msg.queue)
        updated = msgspec.structs.replace(msg, error_msg=error_msg, last_failed_at_s=now_s)
        key_list = [
            q.task(msg.id), q.active, q.lease, q.archived, q.processed_day(now_s),
            q.failed_day(now_s), q.processed_total, q.failed_total,
        ]
        args = [
            msg.id, wire.encode_task(updated), now_s, now_s - ARCHIVED_EXPIRATION_S,
            MAX_ARCHIVE_SIZE, now_s + STATS_TTL_S, MAX_INT64, q.task_prefix,
        ]
        await self._finish(_releasing(("archive", key_list, args), msg, now_s), msg)

    async def forward_if_ready(self, queues: Sequence[str], *, now_ns: int) -> int:
        now_s = now_ns // 1_000_000_000
        moved = 0
        for qname in queues:
            q = keys.queue_keys(qname)
            for source in (q.scheduled, q.retry):
                while True:
                    n = int(
                        await guarded(
                            self.scripts.run(
                                "forward",
                                [source, q.pending],
                                [now_s, q.task_prefix, now_ns, q.group_prefix],
                            )
                        )
                    )
                    moved += n
                    if n < 100:
                        break
        return moved

    async def extend_leases(
        self, qname: str, task_ids: Sequence[str], *, now_s: int
    ) -> tuple[int, list[str]]:
        """Returns the new expiry and the ids that had lost their lease."""
        expires_s = int(now_s) + LEASE_DURATION_S
        if not task_ids:
            return expires_s, []
        q = keys.queue_keys(qname)
        lost = await guarded(self.scripts.run("extend_lease", [q.lease], [expires_s, *task_ids]))
        return expires_s, [i.decode() if isinstance(i, bytes) else str(i) for i in lost]

    async def extend_leases_many(
        self, task_ids_by_queue: Mapping[str, Sequence[str]], *, now_s: int
    ) -> tuple[int, dict[str, list[str]]]:
        """``extend_leases`` for several queues in one round trip (one script call per queue,
        pipelined). Returns the new expiry and, per queue, the ids that had lost their lease.
        Any failure raises, as ``extend_leases`` does: a handler is only stopped for a lease
        that Redis said is gone, never because a reply went missing."""
        expires_s = int(now_s) + LEASE_DURATION_S
        queued = [(q, list(ids)) for q, ids in task_ids_by_queue.items() if ids]
        if not queued:
            return expires_s, {}
        batch = Batch()
        for qname, ids in queued:
            batch.script("extend_lease", [keys.queue_keys(qname).lease], [expires_s, *ids])
        replies = await guarded(self.scripts.execute(batch, ["extend_lease"]))
        lost: dict[str, list[str]] = {}
        for (qname, _ids), reply in zip(queued, replies, strict=True):
            if isinstance(reply, REDIS_DOWN):
                raise errors.BrokerUnavailable(f"redis unavailable: {reply}") from reply
            if isinstance(reply, Exception):
                raise errors.AqshError(f"lease extension failed for {qname!r}: {reply}") from reply
            lost[qname] = [i.decode() if isinstance(i, bytes) else str(i) for i in reply]
        return expires_s, lost

    async def list_lease_expired(
        self, queues: Sequence[str], *, cutoff_s: int
    ) -> list[TaskMessage]:
        out: list[TaskMessage] = []
        for qname in queues:
            q = keys.queue_keys(qname)
            raw = await guarded(
                self.scripts.run("list_lease_expired", [q.lease], [int(cutoff_s), q.task_prefix])
            )
            out.extend(wire.decode_task(m) for m in raw)
        return out

    async def delete_expired_completed(
        self, qname: str, *, now_s: int, batch_size: int = 100
    ) -> int:
        q = keys.queue_keys(qname)
        total = 0
        while True:
            n = int(
                await guarded(
                    self.scripts.run(
                        "delete_expired_completed",
                        [q.completed],
                        [int(now_s), q.task_prefix, batch_size],
                    )
                )
            )
            total += n
            if n < batch_size:
                return total

    async def write_result(self, qname: str, task_id: str, data: bytes) -> int:
        q = keys.queue_keys(qname)
        written = int(await guarded(self.scripts.run("write_result", [q.task(task_id)], [data])))
        if written < 0:
            raise errors.TaskNotFound(f"task {task_id} not found in queue {qname!r}")
        return written

    # ---------------------------------------------------------------- group aggregation
    async def list_groups(self, qname: str) -> list[str]:
        """Names of the queue's groups that hold aggregating tasks (asynq §4.20.1)."""
        names = await guarded(self.client.smembers(keys.queue_keys(qname).groups))
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    async def aggregation_check(
        self, qname: str, group: str, *, now_s: int, grace_period_s: int, max_delay_s: int,
        max_size: int,
    ) -> str | None:
        """Move the group's due tasks into a new aggregation set; its id, or None when the
        group is not due (asynq §4.20.2). The set must be read, enqueued as one task and
        deleted before ``now_s + AGGREGATION_TIMEOUT_S``, or the recoverer gives the tasks
        back to the group."""
        q = keys.queue_keys(qname)
        set_id = str(uuid.uuid4())
        made = await guarded(self.scripts.run(
            "aggregation_check",
            [q.group(group), q.aggregation_set(group, set_id), q.aggregation_sets, q.groups],
            [int(max_size), int(max_delay_s), int(grace_period_s),
             int(now_s) + AGGREGATION_TIMEOUT_S, int(now_s), group]))
        return set_id if int(made) == 1 else None

    async def read_aggregation_set(
        self, qname: str, group: str, set_id: str
    ) -> tuple[list[TaskMessage], int]:
        """The set's messages, oldest first, and its deadline (Unix s; 0 when the set is no
        longer listed, i.e. it was reclaimed or deleted meanwhile)."""
        q = keys.queue_keys(qname)
        reply = await guarded(self.scripts.run(
            "read_aggregation_set", [q.aggregation_set(group, set_id), q.aggregation_sets],
            [q.task_prefix]))
        deadline = reply[0]
        deadline_s = int(float(deadline)) if deadline is not None else 0
        return [wire.decode_task(m) for m in reply[1:]], deadline_s

    async def delete_aggregation_set(self, qname: str, group: str, set_id: str) -> None:
        """The aggregated task is enqueued: the set's tasks and the set itself go."""
        q = keys.queue_keys(qname)
        await guarded(self.scripts.run(
            "delete_aggregation_set", [q.aggregation_set(group, set_id), q.aggregation_sets],
            [q.task_prefix]))

    async def reclaim_stale_aggregation_sets(self, qname: str, *, now_s: int) -> None:
        """Sets past their deadline give their tasks back to their groups (asynq §4.20.5)."""
        await guarded(self.scripts.run(
            "reclaim_stale_aggregation_sets", [keys.queue_keys(qname).aggregation_sets],
            [int(now_s)]))

    # ---------------------------------------------------------------- queue control
    async def pause(self, qname: str, *, now_s: int) -> None:
        q = keys.queue_keys(qname)
        if int(await guarded(self.scripts.run("pause", [q.paused], [int(now_s)]))) == 0:
            raise errors.QueueAlreadyPaused(f'queue "{qname}" is already paused')

    async def unpause(self, qname: str) -> None:
        q = keys.queue_keys(qname)
        if int(await guarded(self.client.delete(q.paused))) == 0:
            raise errors.QueueNotPaused(f'queue "{qname}" is not paused')

    # ---------------------------------------------------------------- server state
    async def write_server_state(
        self,
        info: ServerInfo,
        workers: Sequence[WorkerInfo],
        *,
        ttl_s: int,
        now_s: int,
    ) -> None:
        skey = keys.server_key(info.host, info.pid, info.server_id)
        wkey = keys.workers_key(info.host, info.pid, info.server_id)
        expires_s = int(now_s) + int(ttl_s)
        args: list[Any] = [int(ttl_s), wire.encode_server(info)]
        for worker in workers:
            args += [worker.task_id, wire.encode_worker(worker)]
        # Three slots on a Cluster (the two indexes and the server's own {host:pid:id} pair):
        # one command each, so the batch splits cleanly per node.
        batch = Batch()
        batch.command("ZADD", keys.ALL_SERVERS, expires_s, skey)
        batch.command("ZADD", keys.ALL_WORKERS, expires_s, wkey)
        batch.script("write_server_state", [skey, wkey], args)
        replies = await guarded(self.scripts.execute(batch, ["write_server_state"]))
        for reply in replies:
            if isinstance(reply, REDIS_DOWN):
                raise errors.BrokerUnavailable(f"redis unavailable: {reply}") from reply
            if isinstance(reply, Exception):
                raise errors.AqshError(f"heartbeat write failed: {reply}") from reply

    async def clear_server_state(self, host: str, pid: int, server_id: str) -> None:
        skey = keys.server_key(host, pid, server_id)
        wkey = keys.workers_key(host, pid, server_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(keys.ALL_SERVERS, skey)
        pipe.zrem(keys.ALL_WORKERS, wkey)
        pipe.delete(skey)
        pipe.delete(wkey)
        await guarded(pipe.execute())

    # ---------------------------------------------------------------- scheduler state
    async def write_scheduler_entries(
        self, scheduler_id: str, entries: Sequence[SchedulerEntry], *, ttl_s: int, now_s: int
    ) -> None:
        """A scheduler's heartbeat (asynq §4.22): its entries, announced for ``ttl_s``."""
        key = keys.scheduler_entries_key(scheduler_id)
        await guarded(self.client.zadd(keys.ALL_SCHEDULERS, {key: int(now_s) + int(ttl_s)}))
        await guarded(self.scripts.run(
            "write_scheduler_entries", [key],
            [int(ttl_s), *(wire.encode_scheduler_entry(entry) for entry in entries)]))

    async def record_scheduler_event(
        self, entry_id: str, event: SchedulerEnqueueEvent, *, limit: int
    ) -> None:
        """One periodic enqueue in the entry's history, which keeps the newest ``limit``."""
        await guarded(self.scripts.run(
            "record_scheduler_event", [keys.scheduler_history_key(entry_id)],
            [event.enqueue_time_ns // 1_000_000_000, wire.encode_enqueue_event(event), limit]))

    async def delete_scheduler_histories(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await guarded(self.client.delete(
                *[keys.scheduler_history_key(entry_id) for entry_id in entry_ids]))

    async def clear_scheduler_state(self, scheduler_id: str, entry_ids: Sequence[str]) -> None:
        """A stopping scheduler withdraws its entries and their histories (as asynq)."""
        key = keys.scheduler_entries_key(scheduler_id)
        await guarded(self.client.zrem(keys.ALL_SCHEDULERS, key))
        await guarded(self.client.delete(
            key, *[keys.scheduler_history_key(entry_id) for entry_id in entry_ids]))

    # ---------------------------------------------------------------- pub/sub
    async def _channel(self, channel: str) -> AsyncIterator[str]:
        """Messages of one channel, resubscribing after connection loss.

        The broken subscription is closed before a new one is made (redis-py may already have
        reconnected it on its own, and nobody would read it), and the first resubscription is
        immediate: messages published while unsubscribed are lost, as with any pub/sub. Only
        repeated failures wait between attempts.
        """
        delay_s = 0.0
        while True:
            try:
                async with open_pubsub(self.client) as pubsub:
                    await pubsub.subscribe(channel)
                    delay_s = 0.0
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes):
                            yield data.decode("utf-8", "replace")
            except REDIS_DOWN:
                pass
            except RedisClusterException as exc:  # no node reachable to pick (see guarded)
                if not isinstance(exc.__cause__, REDIS_DOWN):
                    raise
            await asyncio.sleep(delay_s)
            delay_s = _RESUBSCRIBE_DELAY_S

    def cancellations(self) -> AsyncIterator[str]:
        return self._channel(keys.CANCEL_CHANNEL)

    def wakeups(self) -> AsyncIterator[str]:
        """Queue names our own client announced after enqueueing (instant pick-up)."""
        return self._channel(keys.WAKE_CHANNEL)

    async def publish_cancel(self, task_id: str) -> None:
        await guarded(self.client.publish(keys.CANCEL_CHANNEL, task_id))

    async def publish_wake(self, qname: str) -> None:
        await guarded(self.client.publish(keys.WAKE_CHANNEL, qname))

    async def ping(self) -> None:
        """On a Cluster every primary must answer, not just one: each holds a share of the
        queues, and with one of them gone those queues can neither take nor give tasks."""
        if isinstance(self.client, RedisCluster):
            await guarded(self.client.ping(target_nodes=RedisCluster.PRIMARIES))
        else:
            await guarded(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


def _releasing(call: tuple[str, list[str], list[Any]], msg: TaskMessage,
               now_s: int) -> tuple[str, list[str], list[Any]]:
    """A finishing transition that also frees the task's concurrency slot (if it has a rule)
    and promotes the next waiter, in the same script call."""
    return flow.with_release(call, msg, now_s=now_s, now_ns=now_s * 1_000_000_000,
                             reserve_s=LEASE_DURATION_S)


def _raise_reply(reply: Any) -> None:
    """A pipelined script's error reply, raised as a single call's would be."""
    if isinstance(reply, BaseException):
        mapped = broker_error(reply)
        raise mapped if mapped is not None else reply


def raise_for_produce(reply: int, msg: TaskMessage) -> None:
    """Map an enqueue-type script's reply (1 ok, 0 id conflict, -1 duplicate) to an error."""
    if reply == 1:
        return
    if reply == -1:
        raise errors.DuplicateTask(
            f"task already exists: unique lock {msg.unique_key} is held", details={"type": msg.type}
        )
    raise errors.TaskIdConflict(
        f"task id {msg.id!r} already exists in queue {msg.queue!r}", details={"id": msg.id}
    )
