"""Typed views of asynq's records. Everything the Redis layer returns is one of these."""

from __future__ import annotations

import enum

import msgspec


class TaskState(enum.StrEnum):
    """asynq's state strings, exactly as stored in the task hash ``state`` field."""

    ACTIVE = "active"
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RETRY = "retry"
    ARCHIVED = "archived"
    COMPLETED = "completed"
    AGGREGATING = "aggregating"


#: States whose container is a sorted set named after the state.
ZSET_STATES = frozenset(
    {TaskState.SCHEDULED, TaskState.RETRY, TaskState.ARCHIVED, TaskState.COMPLETED}
)


class TaskMessage(msgspec.Struct, kw_only=True):
    """asynq's TaskMessage (protobuf, §3.2). Times are Unix seconds, durations seconds."""

    type: str
    payload: bytes = b""
    id: str = ""
    queue: str = ""
    retry: int = 0
    retried: int = 0
    error_msg: str = ""
    timeout_s: int = 0
    deadline_s: int = 0
    unique_key: str = ""
    last_failed_at_s: int = 0
    retention_s: int = 0
    completed_at_s: int = 0
    group_key: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Bytes of fields this version does not know, kept so a rewrite loses nothing.
    unknown_fields: bytes = b""


class TaskInfo(msgspec.Struct, kw_only=True):
    """A task as the Inspector sees it: message + state + derived times."""

    message: TaskMessage
    state: TaskState
    #: scheduled/retry: when it becomes pending; Unix s, 0 if not applicable.
    next_process_at_s: int = 0
    #: Raw bytes written by the handler's result writer, if any.
    result: bytes | None = None
    #: True when the task is active but its lease has expired (asynq's IsOrphaned).
    is_orphaned: bool = False
    pending_since_ns: int = 0

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def queue(self) -> str:
        return self.message.queue

    @property
    def type(self) -> str:
        return self.message.type


class ServerInfo(msgspec.Struct, kw_only=True):
    """asynq's ServerInfo (§3.4). ``start_time_ns`` is Unix nanoseconds."""

    host: str
    pid: int
    server_id: str
    concurrency: int
    queues: dict[str, int]
    strict_priority: bool = False
    status: str = "active"
    start_time_ns: int = 0
    active_worker_count: int = 0


class WorkerInfo(msgspec.Struct, kw_only=True):
    """asynq's WorkerInfo (§3.5): one per in-flight task."""

    host: str
    pid: int
    server_id: str
    task_id: str
    task_type: str
    task_payload: bytes
    queue: str
    start_time_ns: int
    deadline_ns: int


#: Go's zero time.Time as protobuf Timestamp seconds (0001-01-01T00:00:00Z), §3.7.
GO_ZERO_TIME_S = -62135596800


class SchedulerEntry(msgspec.Struct, kw_only=True):
    """asynq's SchedulerEntry (§3.6). ``prev_enqueue_time_ns`` is None when never fired."""

    id: str
    spec: str
    task_type: str
    task_payload: bytes
    enqueue_options: list[str]
    next_enqueue_time_ns: int
    prev_enqueue_time_ns: int | None = None


class SchedulerEnqueueEvent(msgspec.Struct, kw_only=True):
    task_id: str
    enqueue_time_ns: int
