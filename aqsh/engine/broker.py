"""The Broker: asynq's task transitions, as the processor, client and server see them.

Everything above this protocol (processor, server components, client, HTTP API) talks in
transitions, never in keys. ``aqsh.engine.rdb.RedisBroker`` is the implementation; each method
runs one Lua script from ``lua/`` (or one plain command where asynq uses one) and maps the reply
to a typed value or an ``aqsh.errors`` exception.

Times are passed in by the caller (from an injected Clock): scripts never read Redis TIME.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import msgspec

from aqsh.engine.flow import AfterSwept
from aqsh.engine.models import ServerInfo, TaskMessage, WorkerInfo
from aqsh.errors import AqshError

#: asynq's lease length: a dequeued task's lease expires this long after dequeue unless extended.
LEASE_DURATION_S = 30
#: Daily counters live this long (asynq: 90 days).
STATS_TTL_S = 90 * 24 * 3600
#: Archived tasks older than this are trimmed on archive (asynq: 90 days).
ARCHIVED_EXPIRATION_S = 90 * 24 * 3600
#: The archive keeps fewer than this many tasks (asynq's maxArchiveSize).
MAX_ARCHIVE_SIZE = 10_000
MAX_INT64 = 9_223_372_036_854_775_807
#: An aggregation set must be enqueued and deleted within this time of its making, or the
#: recoverer gives its tasks back to their group (asynq's aggregationTimeout).
AGGREGATION_TIMEOUT_S = 120


class Leased(msgspec.Struct, frozen=True):
    """A dequeued task and the lease expiry written for it (Unix s)."""

    message: TaskMessage
    lease_expires_s: int


class Broker(Protocol):
    # --- producer side -------------------------------------------------------------------
    async def enqueue(self, msg: TaskMessage, *, now_ns: int) -> None:
        """pending. Raises TaskIdConflict."""
        ...

    async def enqueue_unique(self, msg: TaskMessage, *, ttl_s: int, now_ns: int) -> None:
        """pending with a uniqueness lock (msg.unique_key already set).

        Raises DuplicateTask or TaskIdConflict.
        """
        ...

    async def schedule(self, msg: TaskMessage, *, process_at_s: int) -> None:
        """scheduled. Raises TaskIdConflict."""
        ...

    async def schedule_unique(
        self, msg: TaskMessage, *, process_at_s: int, ttl_s: int
    ) -> None:
        """scheduled with a lock. Raises DuplicateTask or TaskIdConflict."""
        ...

    # --- consumer side -------------------------------------------------------------------
    async def dequeue(self, queues: Sequence[str], *, now_s: int) -> Leased | None:
        """Try each queue in order (paused ones skipped); None when all are empty."""
        ...

    async def dequeue_many(
        self, queues: Sequence[str], *, limit: int, now_s: int
    ) -> list[Leased]:
        """Up to ``limit`` tasks in one round trip (same per-task semantics as dequeue)."""
        ...

    async def done(self, msg: TaskMessage, *, now_s: int) -> None:
        """active -> deleted, processed counters, unique lock released. Raises TaskNotFound."""
        ...

    async def mark_as_complete(self, msg: TaskMessage, *, now_s: int) -> None:
        """active -> completed (retention), processed counters, lock released."""
        ...

    async def requeue(self, msg: TaskMessage) -> None:
        """active -> tail of pending (shutdown timeout); no counters."""
        ...

    async def retry(
        self,
        msg: TaskMessage,
        *,
        retry_at_s: int,
        error_msg: str,
        is_failure: bool,
        now_s: int,
    ) -> None:
        """active -> retry; ``retried`` += 1 and counters only when ``is_failure``."""
        ...

    async def archive(self, msg: TaskMessage, *, error_msg: str, now_s: int) -> None:
        """active -> archived with asynq's trimming; failure counters always."""
        ...

    async def forward_if_ready(self, queues: Sequence[str], *, now_ns: int) -> int:
        """scheduled/retry whose time has come -> pending. Returns how many moved."""
        ...

    async def extend_leases(
        self, qname: str, task_ids: Sequence[str], *, now_s: int
    ) -> tuple[int, list[str]]:
        """Extend the lease of these tasks to now + 30 s.

        Returns the new expiry (Unix s) and the ids that no longer had a lease: their handlers
        must stop, because the task may already run elsewhere.
        """
        ...

    async def extend_leases_many(
        self, task_ids_by_queue: Mapping[str, Sequence[str]], *, now_s: int
    ) -> tuple[int, dict[str, list[str]]]:
        """``extend_leases`` for several queues in one round trip; lost ids per queue."""
        ...

    async def list_lease_expired(
        self, queues: Sequence[str], *, cutoff_s: int
    ) -> list[TaskMessage]:
        ...

    async def delete_expired_completed(
        self, qname: str, *, now_s: int, batch_size: int = 100
    ) -> int:
        ...

    async def finish_successes(
        self,
        msgs: Sequence[TaskMessage],
        *,
        now_s: int,
        results: Sequence[bytes | None] | None = None,
    ) -> list[AqshError | None]:
        """done/mark_as_complete (+ result writes) for many tasks in one round trip; one error
        slot per task."""
        ...

    async def write_result(self, qname: str, task_id: str, data: bytes) -> int:
        """Raises TaskNotFound when the task hash is gone."""
        ...

    async def pause(self, qname: str, *, now_s: int) -> None:
        ...

    async def unpause(self, qname: str) -> None:
        ...

    # --- group aggregation (asynq §4.20) --------------------------------------------------
    async def list_groups(self, qname: str) -> list[str]:
        ...

    async def aggregation_check(
        self, qname: str, group: str, *, now_s: int, grace_period_s: int, max_delay_s: int,
        max_size: int,
    ) -> str | None:
        """The id of a new aggregation set holding the group's due tasks, or None."""
        ...

    async def read_aggregation_set(
        self, qname: str, group: str, set_id: str
    ) -> tuple[list[TaskMessage], int]:
        """The set's messages (oldest first) and its deadline in Unix s (0 if gone)."""
        ...

    async def delete_aggregation_set(self, qname: str, group: str, set_id: str) -> None:
        ...

    async def reclaim_stale_aggregation_sets(self, qname: str, *, now_s: int) -> None:
        ...

    async def sweep_dependencies(
            self, qname: str, *, now_s: int,
            before_cancel: Callable[[TaskMessage], Awaitable[None]] | None = None,
    ) -> AfterSwept:
        """Start or cancel the runs waiting for other tasks (aqsh.engine.flow.HEADER_AFTER)
        whose dependencies ended: how many moved, and the messages of those cancelled.
        ``before_cancel`` is awaited with each cancelled run's message before it is archived
        (an observer's durable notice); it raising ends the pass there."""
        ...

    async def repair_flow(self, qname: str, *, now_s: int) -> int:
        """The held-run sweep (aqsh.engine.flow): free dead holders' slots, drop waiters a
        foreign tool moved, promote waiters into free slots. How many were promoted."""
        ...

    # --- server state --------------------------------------------------------------------
    async def write_server_state(
        self,
        info: ServerInfo,
        workers: Sequence[WorkerInfo],
        *,
        ttl_s: int,
        now_s: int,
    ) -> None:
        ...

    async def clear_server_state(self, host: str, pid: int, server_id: str) -> None:
        ...

    def cancellations(self) -> AsyncIterator[str]:
        """Task ids published on ``asynq:cancel``; reconnects on its own."""
        ...

    async def publish_cancel(self, task_id: str) -> None:
        ...

    def wakeups(self) -> AsyncIterator[str]:
        """Queue names announced by aqsh clients right after an enqueue."""
        ...

    async def publish_wake(self, qname: str) -> None:
        ...

    async def ping(self) -> None:
        ...

    async def close(self) -> None:
        ...
